"""Losses against their formulas on hand-computed tensors."""

from __future__ import annotations

import math

import torch

from lmforge.data.sft import IGNORE_INDEX
from lmforge.train.objectives import count_targets, distillation_kl, distillation_loss, token_cross_entropy


def _log_softmax(row):
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def test_cross_entropy_sums_only_targets():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0], [9.0, -9.0, 0.0]]])
    labels = torch.tensor([[1, IGNORE_INDEX, 0]])
    expected = -_log_softmax([1.0, 2.0, 0.5])[1] - _log_softmax([9.0, -9.0, 0.0])[0]
    assert abs(token_cross_entropy(logits, labels).item() - expected) < 1e-6
    assert count_targets(labels) == 2


def test_ignored_positions_get_no_gradient():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 0, 4, IGNORE_INDEX]])
    token_cross_entropy(logits, labels).backward()
    zero = (labels == IGNORE_INDEX)
    assert logits.grad[zero].abs().max() == 0
    assert logits.grad[~zero].abs().min() > 0


def test_distillation_kl_formula_with_temperature():
    s, t, temp = [0.2, 1.0, -0.5], [1.5, 0.0, 0.3], 2.0
    ls, lt = _log_softmax([v / temp for v in s]), _log_softmax([v / temp for v in t])
    kl = sum(math.exp(b) * (b - a) for a, b in zip(ls, lt)) * temp**2
    got = distillation_kl(torch.tensor([[s]]), torch.tensor([[t]]), torch.tensor([[0]]), temperature=temp)
    assert abs(got.item() - kl) < 1e-6


def test_distillation_kl_is_zero_for_identical_models_and_masks_ignored():
    x = torch.randn(2, 3, 7)
    labels = torch.tensor([[0, IGNORE_INDEX, 1], [2, 3, IGNORE_INDEX]])
    assert distillation_kl(x, x.clone(), labels, 3.0).abs().item() < 1e-6
    other = x.clone()
    other[labels == IGNORE_INDEX] += 5.0  # differences at ignored positions do not count
    assert distillation_kl(x, other, labels, 3.0).abs().item() < 1e-6


def test_distillation_loss_mixes_kl_and_ce():
    s, t = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    labels = torch.tensor([[1, 2, 3, IGNORE_INDEX]])
    mixed = distillation_loss(s, t, labels, temperature=2.0, kd_weight=0.3)
    want = 0.3 * distillation_kl(s, t, labels, 2.0) + 0.7 * token_cross_entropy(s, labels)
    assert torch.allclose(mixed, want)
    assert torch.allclose(distillation_loss(s, t, labels, 2.0, kd_weight=1.0), distillation_kl(s, t, labels, 2.0))
