"""One training loop for pretraining, SFT, LoRA/DoRA, distillation, DPO and reward models.

Single process or under ``torchrun`` (DDP, or FSDP2 ``fully_shard``) with the same code. The loss of a
step is the sum of per-token losses divided by the number of target tokens in the whole global batch
(all micro-batches, all ranks), so N processes x A accumulation steps computes the gradient of one
batch of N*A micro-batches, whatever their token counts.

The loop runs the forward pass; an ``Objective`` is a pure function of the model's outputs and the batch.
Device, processes, optimizer, checkpoints, metrics and the run loop are the shared ``train.harness``.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.data.sampler import StepSampler
from lmforge.data.sft import IGNORE_INDEX, pad_collate
from lmforge.data.vision_sft import IMAGE_INPUT_KEYS
from lmforge.errors import ConfigError, LmforgeError
from lmforge.models.llava import text_decoder
from lmforge.models.model import Transformer
from lmforge.train.harness import Harness, lr_multiplier, read_metrics
from lmforge.train.objectives import distillation_loss, token_cross_entropy
from lmforge.train.recipe import TrainConfig, recipe_dict

__all__ = ["Data", "LanguageModeling", "Objective", "TrainResult", "Trainer", "lr_multiplier", "read_metrics"]


# ---- objectives and batches --------------------------------------------------------------------------
class Objective:
    """What a step optimises, as pure functions of tensors. ``loss(outputs, batch)`` gets what the trained
    model returned for ``batch`` (the loop runs the forward) and returns a *sum* over the batch's units
    (target tokens for language modelling, pairs for DPO); the loop divides by ``units`` summed over the
    global batch."""

    name = "objective"

    def collate(self, items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
        return pad_collate(items, pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def forward_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Extra keyword arguments of the model's forward for this batch: its images' tensors, for a
        vision-language model (subclasses add e.g. which logits to compute)."""
        return {k: batch[k] for k in IMAGE_INPUT_KEYS if k in batch}

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


# Files of a model directory that are not weights or tokenizer and that a trained checkpoint keeps.
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

# The share of labelled positions below which the LM head runs on those positions only.
SPARSE_LOGITS_BELOW = 0.75


class LanguageModeling(Objective):
    """Next-token cross-entropy on the logits, or distillation when the loop adds a teacher's ``teacher_logits``."""

    name = "lm"

    def __init__(self, temperature: float = 2.0, kd_weight: float = 0.5) -> None:
        self.temperature, self.kd_weight = temperature, kd_weight

    def forward_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        # Where most positions carry no loss (SFT: only the assistant's tokens), the LM head and the softmax
        # run only at the labelled positions: logits [N, vocab] instead of [B, T, vocab].
        kwargs = super().forward_kwargs(batch)
        labelled = batch["labels"] != IGNORE_INDEX
        if labelled.float().mean() < SPARSE_LOGITS_BELOW:
            kwargs["logits_to_keep"] = labelled
        return kwargs

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"].to(logits.device)
        if logits.dim() == 2:  # computed at the labelled positions only (forward_kwargs)
            labels = labels[labels != IGNORE_INDEX]
        if "teacher_logits" in batch:
            return distillation_loss(logits, batch["teacher_logits"], labels, self.temperature, self.kd_weight)
        return token_cross_entropy(logits, labels)


@dataclass
class Data:
    """What the loop needs from a dataset: items by index, and the sampler of global batch steps."""

    train: Any  # Sequence of items
    val: Any | None
    pad_id: int
    describe: str = ""
    # How items become a batch when the data decides it (images: VisionSFTDataset.collate); else the objective's.
    collate: Callable[[list, int], dict[str, torch.Tensor]] | None = None


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path | None
    losses: list[float]
    val_loss: float | None
    steps: int
    initial_val_loss: float | None = None


# ---- the loop --------------------------------------------------------------------------------------
class Trainer:
    """Holds the pieces of a run; ``fit()`` runs it. Build with ``train.run.build_trainer`` or by hand."""

    name = "train"  # in every checkpoint: resume refuses another loop's checkpoints

    def __init__(self, cfg: TrainConfig, model: Transformer, data: Data, tokenizer: Any = None,
                 teacher: Transformer | None = None, lora: Any = None, objective: Objective | None = None) -> None:
        cfg.validate()
        if cfg.data.seq_len > model.config.max_position_embeddings:
            raise ConfigError(f"recipe field 'data.seq_len' ({cfg.data.seq_len}) exceeds the model's context "
                              f"length ({model.config.max_position_embeddings})")
        self.cfg, self.data, self.tokenizer, self.lora = cfg, data, tokenizer, lora
        self.objective = objective or LanguageModeling(cfg.distill.temperature, cfg.distill.kd_weight)
        self.harness = Harness(cfg.out_dir, cfg, self.name, precision=cfg.precision)
        self.device, self.dist, self.run_dir = self.harness.device, self.harness.dist, self.harness.run_dir
        self.model = model.to(self.device)
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        self.sampler = StepSampler(len(data.train), cfg.batch_size, seed=cfg.seed, rank=self.dist.rank,
                                   world_size=self.dist.world)
        if self.sampler.steps_per_epoch < 1:
            raise LmforgeError(f"the training set has {len(data.train)} sequences, fewer than one global batch "
                               f"({cfg.batch_size} x {self.dist.world} processes); add data or lower batch_size")
        o = cfg.optim
        self.wrapped = self.harness.prepare(
            self.model, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, warmup=o.warmup_steps,
            total=cfg.max_steps, min_lr_ratio=o.min_lr_ratio, fused=o.fused, strategy=cfg.strategy, compile=cfg.compile)
        self.optimizer, self.scheduler = self.harness.optimizer, self.harness.scheduler
        self.step = 0
        self.tokens_seen = 0

    # -- one step --
    def _collate(self, items: list) -> dict[str, torch.Tensor]:
        return (self.data.collate or self.objective.collate)(items, self.data.pad_id)

    def forward(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> Any:
        """Outputs of ``model`` (default: the trained model) on a padded batch, under the run's autocast."""
        return self.harness.forward(batch, model, **self.objective.forward_kwargs(batch))

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = self.forward(batch)
        if self.teacher is not None:
            with torch.no_grad():
                batch = {**batch, "teacher_logits": self.forward(batch, self.teacher)}
        return self.objective.loss(outputs, batch)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on global batch ``self.step``; returns its metrics record."""
        cfg = self.cfg
        if not any(p.requires_grad for p in self.model.parameters()):
            raise LmforgeError("nothing to train: every parameter of the model is frozen")
        t0 = time.perf_counter()
        self.wrapped.train()
        # This rank's micro-batches: micro-step = step * accum + k.
        micro_steps = range(self.step * cfg.grad_accum, (self.step + 1) * cfg.grad_accum)
        batches = [self._collate([self.data.train[i] for i in self.sampler.indices(m)]) for m in micro_steps]
        global_units = self.dist.sum(sum(self.objective.units(b) for b in batches), self.device)
        if global_units == 0:
            raise LmforgeError(f"step {self.step}: the batch has nothing to learn from (all labels masked)")
        # DDP/FSDP average gradients over ranks; scale so the result is sum / global_units.
        scale = self.dist.world / global_units
        loss_sum = 0.0
        for k, batch in enumerate(batches):
            with self.harness.sync_gradients(k == len(batches) - 1):
                loss = self._loss(batch)
                loss_sum += float(loss.detach())
                aux = self.model.aux_loss(batch["attention_mask"].to(self.device))
                if aux is not None:  # MoE load balancing, weighted by this micro-batch's share of tokens
                    loss = loss + aux * self.objective.units(batch)
                (loss * scale).backward()
        grad_norm = self.harness.optimizer_step(cfg.optim.grad_clip, f"step {self.step + 1}")
        tokens = self.dist.sum(sum(int(b["attention_mask"].sum()) for b in batches), self.device)
        self.tokens_seen += int(tokens)
        self.step += 1
        return {"step": self.step, "loss": self.dist.sum(loss_sum, self.device) / global_units,
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": self.tokens_seen,
                "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9)}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per unit (token, pair) over the first ``eval_batches`` batches of the validation set."""
        if self.data.val is None or len(self.data.val) == 0:
            return None
        self.wrapped.eval()
        n_items = min(len(self.data.val), self.cfg.eval_batches * self.cfg.batch_size * self.dist.world)
        mine = list(range(self.dist.rank, n_items, self.dist.world))
        total, units = 0.0, 0
        for i in range(0, max(len(mine), 1), self.cfg.batch_size):
            chunk = mine[i:i + self.cfg.batch_size] or [0]  # FSDP needs every rank in every forward: a dummy batch
            batch = self._collate([self.data.val[j] for j in chunk])
            value = float(self._loss(batch))
            if i < len(mine):
                total += value
                units += self.objective.units(batch)
        total, units = self.dist.sum(total, self.device), self.dist.sum(units, self.device)
        return total / units if units else None

    def _val_metrics(self) -> dict[str, float] | None:
        loss = self.evaluate()
        return None if loss is None else {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    # -- checkpoints --
    def save(self) -> Path:
        state = self.harness.model_state()  # on every rank: FSDP gathers the shards
        trainable = None
        if self.lora is not None:
            names = {n for n, p in self.model.named_parameters() if p.requires_grad}
            trainable = {n: t for n, t in state.items() if n in names}
        return self.harness.save(self.step, lambda tmp: self._write_model(state, tmp), trainable,
                           {"tokens_seen": self.tokens_seen, "recipe": recipe_dict(self.cfg)})

    def _write_model(self, state: dict[str, torch.Tensor], tmp: Path) -> None:
        writer = getattr(type(self.model), "write_checkpoint_model", None)  # e.g. reward models add a head
        if writer is not None:
            writer(state, self.model.config, tmp / "model", self.tokenizer)
            return
        from lmforge.models.checkpoint import save_model

        save_model(self._export(state), tmp / "model", tokenizer=self.tokenizer)
        for name in IMAGE_PROCESSOR_FILES:  # a vision-language model's image processor travels with it
            source = Path(self.cfg.model.path or "") / name
            if self.cfg.model.path and source.is_file():
                shutil.copyfile(source, tmp / "model" / name)
        # An adapter alone is the run only when nothing but adapters trained (model.trainable may add e.g. a
        # projector, which only the merged model above holds).
        only_adapters = all("lora_" in n for n, p in self.model.named_parameters() if p.requires_grad)
        if self.lora is not None and only_adapters:
            from lmforge.train.lora import save_adapter

            # the decoder's adapter (LoRA on a vision-language model adapts its decoder only)
            save_adapter(text_decoder(self._export(state, merge=False)), tmp / "adapter", self.lora,
                         base_model=self.cfg.model.path)

    def _export(self, state: dict[str, torch.Tensor], merge: bool = True) -> Transformer:
        """A plain CPU copy of the model (unsharded; LoRA merged, or with ``merge=False`` kept as adapters)."""
        with torch.device("meta"):
            export = type(self.model)(self.model.config)  # a Transformer, or a vision-language model around one
        if self.lora is not None:
            from lmforge.train.lora import apply_lora, merge_lora

            apply_lora(text_decoder(export), self.lora)
        export.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=True, assign=True)
        if merge and self.lora is not None:
            merge_lora(export)
        decoder = text_decoder(export)
        if merge and decoder.config.tie_embeddings:
            decoder.lm_head.weight = decoder.model.embed_tokens.weight
        return export

    def resume(self, path: Path | None = None) -> bool:
        """Continue from ``path`` or the run's latest checkpoint; False when there is none."""
        state = self.harness.resume(path, self._load_weights)
        if state is None:
            return False
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        return True

    def _load_weights(self, path: Path, trainable: dict[str, torch.Tensor] | None) -> None:
        if self.lora is not None:
            if trainable is None:
                raise LmforgeError(f"{path} has no trainable.safetensors; it was not written by a LoRA run")
            unexpected = self.model.load_state_dict(trainable, strict=False).unexpected_keys
            if unexpected:
                raise LmforgeError(f"{path}: trainable tensors do not match this model: {unexpected[:3]}")
            return
        reader = getattr(type(self.model), "read_checkpoint_state", None)  # e.g. reward models read their head
        if reader is not None:
            self.harness.set_model_state(reader(path / "model"))
        else:
            from lmforge.models.checkpoint import load_model

            self.harness.set_model_state(load_model(path / "model", dtype=torch.float32).state_dict())

    # -- the run --
    def fit(self, resume: bool | str | Path = False,
            on_step: Callable[[Trainer, dict[str, Any]], None] | None = None) -> TrainResult:
        cfg = self.cfg
        records, last_saved = self.harness.run(
            self, cfg.max_steps, config=("recipe.json", recipe_dict(cfg)), resume=resume,
            on_step=None if on_step is None else (lambda record: on_step(self, record)),
            show=("loss", "lr", "tokens_per_s"), evaluate=self._val_metrics, eval_every=cfg.eval_every)
        val = [r for r in records if "val_loss" in r]
        return TrainResult(self.run_dir, last_saved, [r["loss"] for r in records if "loss" in r],
                           val[-1]["val_loss"] if val else None, self.step,
                           val[0]["val_loss"] if val and val[0]["step"] == 0 else None)
