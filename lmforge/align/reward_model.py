"""Scalar reward models: a Transformer backbone plus a linear head read at each row's last real token.

The model and its checkpoint format are ``lmforge.models.reward`` (re-exported here); this module trains it.
Trained on preference pairs with the Bradley-Terry loss (Ouyang et al. 2022, eq. 1) through the training
engine's ``Objective`` interface, so optimiser, schedule, accumulation and DDP come from ``Trainer``.

On disk a reward model is an ordinary HF checkpoint directory (the backbone, loadable by itself) plus
``reward_head.safetensors`` and a ``reward_model.json`` marker.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.align.dpo import preference_data
from lmforge.align.losses import bradley_terry_loss
from lmforge.align.preference_data import collate_pairs
from lmforge.errors import ConfigError, LmforgeError
from lmforge.models.model import Transformer
from lmforge.models.reward import HEAD_FILE, MARKER_FILE, RewardModel, load_reward_model, save_reward_model
from lmforge.train.recipe import TrainConfig
from lmforge.train.run import register_task
from lmforge.train.trainer import Objective, Trainer


class RewardObjective(Objective):
    """Bradley-Terry loss summed over pairs on ``collate_pairs`` batches (``[2B, T]``, chosen rows first);
    the loop divides by the global number of pairs."""

    name = "reward"

    def collate(self, items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_pairs(items, pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, rewards: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``rewards``: what the RewardModel returned for the batch, ``[2B]`` (chosen rows first)."""
        if rewards.dim() != 1:
            raise LmforgeError(f"RewardObjective needs a RewardModel (rewards [B]); the model returned "
                               f"shape {tuple(rewards.shape)}")
        chosen, rejected = rewards.chunk(2)
        mean_loss, _ = bradley_terry_loss(chosen, rejected)
        return mean_loss * chosen.shape[0]  # a sum over pairs, as Objective.loss requires


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, dataset: Sequence[dict[str, torch.Tensor]], pad_id: int,
                      batch_size: int = 16) -> dict[str, float]:
    """Share of pairs where the chosen completion scores strictly higher (ties count as wrong), and the
    mean reward margin. ``dataset`` holds ``encode_pair`` items."""
    items = list(getattr(dataset, "items", dataset))
    if not items:
        raise LmforgeError("pairwise_accuracy needs at least one preference pair")
    wins, margin = 0, 0.0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = collate_pairs(chunk, pad_id)
        r = rm.score(batch["input_ids"], batch["attention_mask"])
        diff = r[:len(chunk)] - r[len(chunk):]
        wins += int((diff > 0).sum())
        margin += float(diff.sum())
    return {"accuracy": wins / len(items), "margin": margin / len(items)}


# ---- the ``rm`` recipe task ------------------------------------------------------------------------------
def reward_model_trainer(cfg: TrainConfig, model: Transformer, data, tokenizer=None, lora=None,
                         teacher=None) -> Trainer:
    if lora is not None:
        raise ConfigError("recipe field 'lora.enabled': reward models train all weights for now")
    return Trainer(cfg, RewardModel(model, seed=cfg.seed), data, tokenizer=tokenizer, objective=RewardObjective())


register_task("rm", preference_data, reward_model_trainer)


__all__ = ["HEAD_FILE", "MARKER_FILE", "RewardModel", "RewardObjective", "load_reward_model", "pairwise_accuracy", "save_reward_model"]
