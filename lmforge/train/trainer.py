"""One training loop for pretraining, SFT, LoRA/DoRA and distillation.

Single process or under ``torchrun`` (DDP, or FSDP2 ``fully_shard``) with the same code. The loss of a
step is the sum of per-token losses divided by the number of target tokens in the whole global batch
(all micro-batches, all ranks), so N processes x A accumulation steps computes the gradient of one
batch of N*A micro-batches, whatever their token counts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from lmforge.data.sft import pad_collate
from lmforge.errors import ConfigError, LmforgeError
from lmforge.io import atomic_file
from lmforge.models.model import Transformer
from lmforge.train import checkpoint as ckpt
from lmforge.train.objectives import IGNORE_INDEX, distillation_loss, token_cross_entropy
from lmforge.train.recipe import TrainConfig, recipe_dict


# ---- processes and devices ----------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float | torch.Tensor, device: torch.device) -> float:
        t = torch.as_tensor(value, dtype=torch.float64, device=device)
        if self.world > 1:
            dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where it is fast (recent GPUs); CPUs keep fp32, where bf16 matmuls are often slower.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# ---- optimisation -------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not norms, biases or 1-D gains)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.optim.fused
    if fused is None:
        fused = device.type in ("cuda", "cpu") and not _is_fsdp(model)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             fused=fused)


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _is_fsdp(model: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


# ---- objectives and batches --------------------------------------------------------------------------
class Objective:
    """What a step optimises. ``loss`` returns a *sum* over the batch's units (target tokens for language
    modelling, pairs for DPO); the loop divides by ``units`` summed over the global batch."""

    name = "objective"

    def collate(self, items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
        return pad_collate(items, pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, trainer: "Trainer", batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class LanguageModeling(Objective):
    """Next-token cross-entropy, or distillation to ``trainer.teacher`` when there is one."""

    name = "lm"

    def loss(self, trainer: "Trainer", batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = trainer.forward(batch)
        labels = batch["labels"].to(trainer.device)
        if trainer.teacher is not None:
            with torch.no_grad():
                teacher_logits = trainer.forward(batch, model=trainer.teacher)
            return distillation_loss(logits, teacher_logits, labels, trainer.cfg.distill.temperature,
                                     trainer.cfg.distill.kd_weight)
        return token_cross_entropy(logits, labels)


@dataclass
class Data:
    """What the loop needs from a dataset: items by index, and the sampler of global batch steps."""

    train: Any  # Sequence of items
    val: Any | None
    pad_id: int
    describe: str = ""


def micro_batches(data: Data, sampler, step: int, accum: int, objective: Objective) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches for global step ``step`` (micro-step = step * accum + i)."""
    return [objective.collate([data.train[i] for i in sampler.indices(step * accum + k)], data.pad_id)
            for k in range(accum)]


# ---- the loop --------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path | None
    losses: list[float]
    val_loss: float | None
    steps: int
    initial_val_loss: float | None = None


class Trainer:
    """Holds the pieces of a run; ``fit()`` runs it. Build with ``Trainer.from_recipe`` or by hand."""

    def __init__(self, cfg: TrainConfig, model: Transformer, data: Data, tokenizer: Any = None,
                 teacher: Transformer | None = None, lora: Any = None, objective: Objective | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.objective = objective or LanguageModeling()
        self.device = pick_device(cfg.device)
        self.dist = setup_distributed(self.device)
        self.run_dir = Path(cfg.out_dir)
        self.tokenizer, self.teacher, self.lora = tokenizer, teacher, lora
        self.data = data
        if cfg.data.seq_len > model.config.max_position_embeddings:
            raise ConfigError(f"recipe field 'data.seq_len' ({cfg.data.seq_len}) exceeds the model's context "
                              f"length ({model.config.max_position_embeddings})")
        self.model = model.to(self.device)
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        if teacher is not None:
            self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        from lmforge.data.sampler import StepSampler

        micro = cfg.batch_size
        self.sampler = StepSampler(len(data.train), micro, seed=cfg.seed, rank=self.dist.rank,
                                   world_size=self.dist.world)
        if self.sampler.steps_per_epoch < 1:
            raise LmforgeError(f"the training set has {len(data.train)} sequences, fewer than one global batch "
                               f"({micro} x {self.dist.world} processes); add data or lower batch_size")
        self.autocast = autocast_dtype(cfg.precision, self.device)
        self.wrapped = self._wrap(self.model)
        self.optimizer = build_optimizer(self.wrapped, cfg, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio))
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []

    # -- distributed wrapping (PyTorch's own engines) --
    def _wrap(self, model: Transformer) -> nn.Module:
        wrapped: nn.Module = model
        if self.dist.world > 1:
            if self.cfg.strategy == "fsdp":
                from torch.distributed.fsdp import fully_shard

                for block in model.model.layers:
                    fully_shard(block)
                wrapped = fully_shard(model)
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP

                wrapped = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    # -- one step --
    def forward(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> torch.Tensor:
        """Logits of ``model`` (default: the trained model) on a padded batch, under the run's autocast."""
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        mask_arg = None if bool(mask.all()) else mask  # all-real batches take SDPA's causal fast path
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            return (model or self.wrapped)(ids, attention_mask=mask_arg)

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        loss = self.objective.loss(self, batch)
        return loss, float(loss.detach())

    def train_step(self) -> dict[str, float]:
        cfg, model = self.cfg, self.wrapped
        if not any(p.requires_grad for p in self.model.parameters()):
            raise LmforgeError("nothing to train: every parameter of the model is frozen")
        model.train()
        batches = micro_batches(self.data, self.sampler, self.step, cfg.grad_accum, self.objective)
        local_targets = sum(self.objective.units(b) for b in batches)
        global_targets = self.dist.sum(local_targets, self.device)
        if global_targets == 0:
            raise LmforgeError(f"step {self.step}: the batch has nothing to learn from (all labels masked)")
        # DDP/FSDP average gradients over ranks; scale so the result is sum / global_targets.
        scale = self.dist.world / global_targets
        loss_sum = 0.0
        for k, batch in enumerate(batches):
            sync = k == len(batches) - 1
            no_sync = getattr(model, "no_sync", None)
            with (no_sync() if (no_sync and not sync) else contextlib.nullcontext()):
                if hasattr(model, "set_requires_gradient_sync"):  # FSDP2's spelling
                    model.set_requires_gradient_sync(sync)
                loss, value = self._forward_loss(batch)
                aux = self.model.aux_loss(batch["attention_mask"].to(self.device))
                if aux is not None:  # MoE load balancing, weighted by this micro-batch's share of tokens
                    loss = loss + aux * self.objective.units(batch)
                (loss * scale).backward()
                loss_sum += value
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = self.dist.sum(sum(int(b["attention_mask"].sum()) for b in batches), self.device)
        self.tokens_seen += int(tokens)
        self.step += 1
        return {"loss": self.dist.sum(loss_sum, self.device) / global_targets, "grad_norm": grad_norm,
                "tokens": tokens}

    def _clip(self) -> float:
        params = [p for p in self.wrapped.parameters() if p.grad is not None]
        if not params:
            raise LmforgeError("no parameter received a gradient; is everything frozen?")
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per unit (token, pair) over the first ``eval_batches`` batches of the validation set."""
        if self.data.val is None or len(self.data.val) == 0:
            return None
        self.wrapped.eval()
        n_items = min(len(self.data.val), self.cfg.eval_batches * self.cfg.batch_size * self.dist.world)
        mine = list(range(self.dist.rank, n_items, self.dist.world))
        total, targets = 0.0, 0
        for i in range(0, max(len(mine), 1), self.cfg.batch_size):
            chunk = mine[i:i + self.cfg.batch_size]
            if not chunk:  # FSDP needs every rank in every forward; run a dummy batch
                chunk = [0]
            batch = self.objective.collate([self.data.val[j] for j in chunk], self.data.pad_id)
            loss, value = self._forward_loss(batch)
            if i < len(mine):
                total += value
                targets += self.objective.units(batch)
        total, targets = self.dist.sum(total, self.device), self.dist.sum(targets, self.device)
        return total / targets if targets else None

    # -- checkpoints --
    def save(self) -> Path:
        from lmforge.models.checkpoint import save_model

        model_state = self._full_state_dict()
        optimizer_state = {"optimizer": self._optimizer_state(), "scheduler": self.scheduler.state_dict(),
                           "rng": ckpt.rng_state()}
        if not self.dist.main:
            self.dist.barrier()
            return ckpt.step_dir(self.run_dir, self.step)

        writer = getattr(type(self.model), "write_checkpoint_model", None)  # e.g. reward models add a head

        def write_model(tmp: Path) -> None:
            if writer is not None:
                writer(model_state, self.model.config, tmp / "model", self.tokenizer)
                return
            export = self._export_model(model_state)
            save_model(export, tmp / "model", tokenizer=self.tokenizer)
            if self.lora is not None:
                from lmforge.train.lora import save_adapter

                save_adapter(self._adapter_view(model_state), tmp / "adapter", self.lora,
                             base_model=self.cfg.model.path)

        trainable = None
        if self.lora is not None:
            names = {n for n, p in self.model.named_parameters() if p.requires_grad}
            trainable = {n: t for n, t in model_state.items() if n in names}
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.dist.world,
                 "recipe": recipe_dict(self.cfg)}
        path = ckpt.write_checkpoint(self.run_dir, self.step, write_model=write_model, trainable=trainable,
                                     optimizer_state=optimizer_state, state=state, keep=self.cfg.keep_checkpoints)
        self.dist.barrier()
        return path

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        if _is_fsdp(self.wrapped):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def _optimizer_state(self) -> dict[str, Any]:
        if _is_fsdp(self.wrapped):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _export_model(self, state: dict[str, torch.Tensor]) -> Transformer:
        """A plain (unsharded, LoRA-merged) copy of the model for the HF export."""
        with torch.device("meta"):
            export = Transformer(self.model.config)
        if self.lora is not None:
            from lmforge.train.lora import apply_lora, merge_lora

            apply_lora(export, self.lora)
            export.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=True, assign=True)
            merge_lora(export)
        else:
            export.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=True, assign=True)
        if self.model.config.tie_embeddings:
            export.lm_head.weight = export.model.embed_tokens.weight
        return export

    def _adapter_view(self, state: dict[str, torch.Tensor]) -> Transformer:
        with torch.device("meta"):
            view = Transformer(self.model.config)
        from lmforge.train.lora import apply_lora

        apply_lora(view, self.lora)
        view.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=True, assign=True)
        return view

    def resume(self, path: Path | None = None) -> bool:
        """Continue from ``path`` or the run's latest checkpoint; False when there is none."""
        path = path or ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return False
        state, opt, trainable = ckpt.read_checkpoint(path)
        if self.lora is not None:
            if trainable is None:
                raise LmforgeError(f"{path} has no trainable.safetensors; it was not written by a LoRA run")
            missing = self.model.load_state_dict(trainable, strict=False).unexpected_keys
            if missing:
                raise LmforgeError(f"{path}: trainable tensors do not match this model: {missing[:3]}")
        else:
            from lmforge.models.checkpoint import load_model

            reader = getattr(type(self.model), "read_checkpoint_state", None)
            if reader is not None:
                self._set_model_state(reader(path / "model"))
            else:
                self._set_model_state(load_model(path / "model", dtype=torch.float32).state_dict())
        self._set_optimizer_state(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        ckpt.set_rng_state(opt["rng"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        if state.get("world_size", 1) != self.dist.world and self.dist.main:
            print(f"note: {path} was written by {state['world_size']} processes, resuming with {self.dist.world}; "
                  "the data order differs from an uninterrupted run")
        return True

    def _set_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if _is_fsdp(self.wrapped):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        else:
            with torch.no_grad():
                for name, p in self.model.state_dict().items():
                    p.copy_(state[name])

    def _set_optimizer_state(self, state: dict[str, Any]) -> None:
        if _is_fsdp(self.wrapped):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state)

    # -- the run --
    def fit(self, resume: bool | str | Path = False,
            on_step: Callable[["Trainer", dict[str, Any]], None] | None = None) -> TrainResult:
        cfg = self.cfg
        if resume:
            found = self.resume(None if resume is True else Path(resume))
            if not found and self.dist.main:
                print(f"note: no checkpoint in {self.run_dir}; starting from scratch")
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.json").write_text(json.dumps(recipe_dict(cfg), indent=2))
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_until=self.step, enabled=self.dist.main)
        bar = _progress(cfg.max_steps, self.step, enabled=self.dist.main and cfg.progress)
        losses: list[float] = []
        val_loss = None
        last_saved = None
        initial_val = None
        if self.step == 0 and cfg.eval_every:  # the curve's starting point
            initial_val = self.evaluate()
            if initial_val is not None:
                metrics.write({"step": 0, "val_loss": round(initial_val, 6), "val_ppl": round(math.exp(min(initial_val, 50)), 3)})
        t_last, tokens_last = time.perf_counter(), self.tokens_seen
        while self.step < cfg.max_steps:
            out = self.train_step()
            losses.append(out["loss"])
            now = time.perf_counter()
            rate = (self.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, self.tokens_seen
            record = {"step": self.step, "loss": round(out["loss"], 6), "lr": self.scheduler.get_last_lr()[0],
                      "grad_norm": round(out["grad_norm"], 6), "tokens": self.tokens_seen,
                      "tokens_per_s": round(rate, 1)}
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{rate:,.0f}", refresh=False)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                val_loss = self.evaluate()
                if val_loss is not None:
                    metrics.write({"step": self.step, "val_loss": round(val_loss, 6),
                                   "val_ppl": round(math.exp(min(val_loss, 50)), 3)})
                    bar.write(f"step {self.step}: val loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
            if on_step is not None:
                on_step(self, record)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                last_saved = self.save()
        bar.close()
        val_loss = self.evaluate()
        if val_loss is not None:
            metrics.write({"step": self.step, "val_loss": round(val_loss, 6),
                           "val_ppl": round(math.exp(min(val_loss, 50)), 3)})
        if last_saved is None or last_saved.name != ckpt.step_dir(self.run_dir, self.step).name:
            last_saved = self.save()
        if self.dist.main and cfg.plot:
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        return TrainResult(self.run_dir, last_saved, losses, val_loss, self.step, initial_val)


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records after the resumed step are dropped first."""

    def __init__(self, path: Path, keep_until: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if rec.get("step", 0) <= keep_until:
                    kept.append(line)
        with atomic_file(path, "w") as f:
            f.write("".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, out: Path) -> None:
    """Training (and validation) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def write(self, s: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return _NoBar()
    import sys

    from tqdm.auto import tqdm

    # In a log file (CI, nohup) a bar redrawn 10x a second is noise: redraw rarely there.
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                mininterval=0.2 if sys.stderr.isatty() else 30.0)
