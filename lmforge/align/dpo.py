"""Preference optimisation on the training engine: DPO, conservative DPO, IPO and SimPO, each optionally
with an NLL term on the chosen answer (DPO+NLL / RPO).

The reference model's log-probabilities are computed once, before training, and stored with each pair
(the reference never changes during a DPO run, so recomputing it every step would double the cost).
Everything else — optimizer, schedule, accumulation, DDP/FSDP, checkpoints, resume, metrics — is the
training engine's.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lmforge.align.losses import dpo_loss, sequence_logprobs, simpo_loss, with_chosen_nll
from lmforge.align.preference_data import collate_pairs, encode_pair, read_preference_jsonl
from lmforge.data.sft import IGNORE_INDEX, SequenceTooLong
from lmforge.errors import LmforgeError
from lmforge.train.recipe import TrainConfig
from lmforge.train.run import register_task
from lmforge.train.trainer import Objective, Trainer

LOSS_TYPES = ("sigmoid", "ipo", "simpo")


class PreferenceObjective(Objective):
    """Loss summed over pairs; the loop averages over the global number of pairs."""

    name = "dpo"

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, nll_weight: float = 0.0) -> None:
        if loss_type not in LOSS_TYPES:
            raise LmforgeError(f"unknown preference loss {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
        self.beta, self.loss_type, self.label_smoothing, self.simpo_gamma = beta, loss_type, label_smoothing, simpo_gamma
        self.nll_weight = nll_weight  # > 0: DPO+NLL (Pang et al. 2024), see ``with_chosen_nll``
        # IPO and SimPO are defined on length-averaged log-probabilities, DPO on sums.
        self.average = loss_type in ("ipo", "simpo")

    def collate(self, items, pad_id):
        batch = collate_pairs(items, pad_id)
        if "ref_chosen_logp" in items[0]:
            batch["ref_logps"] = torch.stack([torch.stack([it["ref_chosen_logp"], it["ref_rejected_logp"]])
                                              for it in items])  # [B, 2]
        return batch

    def units(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def policy_logps(self, logits: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's log-probabilities of the chosen and the rejected completions (rows [:B] and [B:])."""
        logps = sequence_logprobs(logits, batch["labels"].to(logits.device), average=self.average)
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        chosen, rejected = self.policy_logps(logits, batch)
        if self.loss_type == "simpo":
            losses = simpo_loss(chosen, rejected, self.beta, self.simpo_gamma)
        else:
            if "ref_logps" not in batch:
                raise LmforgeError("DPO needs reference log-probabilities; call cache_reference_logps first")
            ref = batch["ref_logps"].to(chosen.device)
            losses, _, _ = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.beta,
                                    label_smoothing=self.label_smoothing, loss_type=self.loss_type)
        if self.nll_weight:
            tokens = torch.ones_like(chosen) if self.average else \
                (batch["labels"][:chosen.shape[0]] != IGNORE_INDEX).sum(1).to(chosen.device)
            losses = with_chosen_nll(losses, chosen, tokens, self.nll_weight)
        return losses.sum()


class PreferenceDataset:
    """Encoded pairs (dropping, and counting, those whose completion does not fit ``max_len``)."""

    def __init__(self, paths: Sequence[str], tokenizer, max_len: int) -> None:
        self.items: list[dict[str, torch.Tensor]] = []
        self.dropped = 0
        for path in paths:
            for pair in read_preference_jsonl(path):
                try:
                    self.items.append(encode_pair(tokenizer, pair, max_len))
                except SequenceTooLong:
                    self.dropped += 1
        if not self.items:
            raise LmforgeError(f"no usable preference pairs in {', '.join(paths)} (dropped {self.dropped})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]

    def split_off(self, n: int) -> "PreferenceDataset | None":
        """Move the first ``n`` pairs into a new dataset (held-out pairs); None when ``n`` is 0."""
        if n <= 0:
            return None
        held = PreferenceDataset.__new__(PreferenceDataset)
        held.items, held.dropped = self.items[:n], 0
        self.items = self.items[n:]
        return held


@torch.no_grad()
def cache_reference_logps(trainer: Trainer, datasets: Sequence[PreferenceDataset | None],
                          objective: PreferenceObjective, batch_size: int = 16) -> None:
    """Store the current (not yet trained) model's log-probs in every pair: it is the DPO reference."""
    model = trainer.model
    was_training = model.training
    model.eval()
    for ds in datasets:
        if ds is None:
            continue
        for start in range(0, len(ds), batch_size):
            items = ds.items[start:start + batch_size]
            batch = collate_pairs(items, trainer.data.pad_id)
            logits = trainer.forward(batch, model=model)
            logps = sequence_logprobs(logits, batch["labels"].to(logits.device), average=objective.average).float().cpu()
            half = len(items)
            for i, it in enumerate(items):
                it["ref_chosen_logp"], it["ref_rejected_logp"] = logps[i], logps[half + i]
    model.train(was_training)


@torch.no_grad()
def preference_accuracy(trainer: Trainer, dataset: PreferenceDataset, objective: PreferenceObjective,
                        batch_size: int = 16) -> dict[str, float]:
    """Share of pairs whose implicit reward (policy minus reference log-ratio) prefers the chosen answer,
    and the mean reward margin."""
    trainer.model.eval()
    wins, margin, n = 0, 0.0, 0
    for start in range(0, len(dataset), batch_size):
        items = dataset.items[start:start + batch_size]
        batch = objective.collate(items, trainer.data.pad_id)
        chosen, rejected = objective.policy_logps(trainer.forward(batch), batch)
        diff = chosen - rejected
        if "ref_logps" in batch:
            diff = diff - (batch["ref_logps"][:, 0] - batch["ref_logps"][:, 1]).to(diff.device)
        wins += int((diff > 0).sum())
        margin += float(diff.sum()) * objective.beta
        n += len(items)
    return {"accuracy": wins / n, "margin": margin / n}


# ---- the ``dpo`` recipe task ---------------------------------------------------------------------------
def preference_data(cfg: TrainConfig, tokenizer, procs) -> tuple[PreferenceDataset, PreferenceDataset | None, str]:
    """Train and held-out pairs of a recipe (``data.val``, or ``data.val_fraction`` of the training pairs)."""
    train = PreferenceDataset(cfg.data.train, tokenizer, cfg.data.seq_len)
    if cfg.data.val:
        val = PreferenceDataset(cfg.data.val, tokenizer, cfg.data.seq_len)
    else:
        val = train.split_off(int(len(train) * cfg.data.val_fraction))
    dropped = f" ({train.dropped} dropped: too long)" if train.dropped else ""
    return train, val, f"{len(train):,} preference pairs{dropped}"


def dpo_trainer(cfg: TrainConfig, model, data, tokenizer=None, lora=None, teacher=None) -> Trainer:
    p = cfg.preference
    objective = PreferenceObjective(p.beta, p.loss_type, p.label_smoothing, p.simpo_gamma, p.nll_weight)
    trainer = Trainer(cfg, model, data, tokenizer=tokenizer, lora=lora, objective=objective)
    if p.loss_type != "simpo":  # SimPO is reference-free
        cache_reference_logps(trainer, [data.train, data.val], objective, batch_size=cfg.batch_size)
    return trainer


register_task("dpo", preference_data, dpo_trainer)
