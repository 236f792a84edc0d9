"""Training objectives: pure functions of tensors.

Every loss returns a *sum* over target tokens; the training loop divides by the number of target
tokens in the whole (accumulated, all-ranks) batch, so gradient accumulation and data parallelism
give exactly the gradient of one big batch even when micro-batches hold different token counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.data.sft import IGNORE_INDEX


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE_INDEX.

    ``labels`` are already aligned with ``logits`` (labels[:, t] is the target for position t).
    """
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Sum over target positions of KL(teacher_T || student_T) * T^2 (forward KL, Hinton et al. 2015).

    Softening both distributions by T shrinks gradients by 1/T^2, hence the T^2 factor, which keeps the
    term's scale comparable to cross-entropy as T changes.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ; do the models share a vocabulary?")
    keep = labels != IGNORE_INDEX
    s = F.log_softmax(student_logits[keep].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[keep].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum() * temperature**2


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 2.0, kd_weight: float = 0.5) -> torch.Tensor:
    """kd_weight * KL(teacher || student) + (1 - kd_weight) * cross-entropy on the labels (sums)."""
    kd = distillation_kl(student_logits, teacher_logits, labels, temperature)
    if kd_weight >= 1.0:
        return kd
    return kd_weight * kd + (1.0 - kd_weight) * token_cross_entropy(student_logits, labels)


def count_targets(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())
