"""What every training run shares, whatever its step does: ``Trainer`` (pretraining, SFT, distillation, DPO,
reward models) and ``OnPolicyTrainer`` (GRPO, PPO) each hold a ``Harness`` and keep only their step. It has
the device and processes (DDP, FSDP2), the forward of a padded batch, AdamW and its schedule, atomic
checkpoints (``train.checkpoint``) with exact resume, metrics.jsonl, the progress bar, loss.png, and the loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import CheckpointError, LmforgeError
from lmforge.io import atomic_file
from lmforge.models.device import pick_device
from lmforge.train import checkpoint as ckpt
from lmforge.train.recipe import RunSpec


# ---- processes and devices ----------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

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
    return Dist(dist.get_rank(), dist.get_world_size())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where it is fast (recent GPUs); CPUs keep fp32, where bf16 matmuls are often slower.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 autocast trains a small
    model ~1.5x faster than float32 (measured on the quickstart's pretraining); elsewhere it is emulated, slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def is_fsdp(model: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps (``min_ratio=1``: constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- the harness ------------------------------------------------------------------------------------
class Harness:
    """One run in ``run_dir``; ``prepare`` it once with the module to train. ``name`` is written into every
    checkpoint, and resuming refuses a checkpoint of another name."""

    def __init__(self, run_dir: str | Path, spec: RunSpec, name: str, precision: str = "fp32") -> None:
        self.run_dir, self.spec, self.name = Path(run_dir), spec, name
        self.device = pick_device(spec.device)
        self.dist = setup_distributed(self.device)
        self.autocast = autocast_dtype(precision, self.device)
        self.module: nn.Module | None = None  # what is trained, unwrapped
        self.wrapped: nn.Module | None = None  # the same for forward/backward: DDP/FSDP, compiled
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    def prepare(self, module: nn.Module, *, lr: float, betas: tuple[float, float], eps: float = 1e-8,
                weight_decay: float = 0.0, warmup: int = 0, total: int = 1, min_lr_ratio: float = 1.0,
                fused: bool | None = None, strategy: str = "ddp", compile: bool = False) -> nn.Module:
        """Wrap ``module`` (DDP, or FSDP2 on each decoder layer and the whole; compiled if asked) and build
        AdamW over its trainable parameters (weight decay on matrices only) and the warmup + cosine schedule."""
        self.module = wrapped = module
        if self.dist.world > 1 and strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in module.model.layers:
                fully_shard(block)
            wrapped = fully_shard(module)
        elif self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.wrapped = torch.compile(wrapped) if compile else wrapped
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        if not params:
            raise LmforgeError("nothing to train: every parameter of the model is frozen")
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        if fused is None:
            fused = self.device.type in ("cuda", "cpu") and not is_fsdp(self.wrapped)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, warmup, total, min_lr_ratio))
        return self.wrapped

    # -- a step --
    def forward(self, batch: dict[str, torch.Tensor], module: nn.Module | None = None, **kwargs: Any) -> Any:
        """What ``module`` (default: the wrapped, trained one) returns for a padded batch, under the run's
        autocast; ``kwargs`` go to the module. An all-real attention mask is dropped, so such batches take
        SDPA's causal fast path."""
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        kwargs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            return (module or self.wrapped)(ids, attention_mask=None if bool(mask.all()) else mask, **kwargs)

    def sync_gradients(self, sync: bool) -> contextlib.AbstractContextManager:
        """For gradient accumulation: no all-reduce of gradients in backward unless ``sync`` (the last micro-batch)."""
        if hasattr(self.wrapped, "set_requires_gradient_sync"):  # FSDP2's spelling
            self.wrapped.set_requires_gradient_sync(sync)
        no_sync = getattr(self.wrapped, "no_sync", None)
        return no_sync() if (no_sync and not sync) else contextlib.nullcontext()

    def optimizer_step(self, grad_clip: float, what: str) -> float:
        """Clip (0: no clipping, the norm is still measured), step optimizer and schedule, clear the
        gradients; returns the gradient norm. A non-finite norm stops the run before it reaches the weights."""
        params = [p for p in self.wrapped.parameters() if p.grad is not None]
        if not params:
            raise LmforgeError("no parameter received a gradient; is everything frozen?")
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
        if not math.isfinite(norm):  # the same on every rank: gradients are all-reduced by now
            raise LmforgeError(f"{what}: the loss or its gradient is not finite (gradient norm {norm}); "
                               "stopping before the update corrupts the weights")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- checkpoints --
    def model_state(self) -> dict[str, torch.Tensor]:
        """The trained module's full state dict (under FSDP every rank must call: it gathers the shards)."""
        if is_fsdp(self.wrapped):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def set_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if is_fsdp(self.wrapped):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))
            return
        with torch.no_grad():
            for name, p in self.module.state_dict().items():
                p.copy_(state[name])

    def save(self, step: int, write_model: Callable[[Path], None], trainable: dict[str, torch.Tensor] | None,
             state: dict[str, Any]) -> Path:
        """Checkpoint ``step`` atomically (see ``train.checkpoint``); every rank calls, rank 0 writes.
        ``write_model(dir)`` writes ``dir/model`` (and whatever else belongs beside it); ``trainable`` holds
        tensors the model directory cannot (LoRA weights as trained, a value head); ``state`` goes to state.json."""
        if is_fsdp(self.wrapped):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optimizer = get_optimizer_state_dict(self.module, self.optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optimizer = self.optimizer.state_dict()
        path = ckpt.step_dir(self.run_dir, step)
        if self.dist.main:
            resume_state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state()}
            ckpt.write_checkpoint(self.run_dir, step, write_model=write_model, trainable=trainable,
                                  optimizer_state=resume_state, keep=self.spec.keep_checkpoints,
                                  state={"trainer": self.name, "step": step, "world_size": self.dist.world, **state})
        self.dist.barrier()
        return path

    def resume(self, path: str | Path | None,
               load_weights: Callable[[Path, dict[str, torch.Tensor] | None], None]) -> dict[str, Any] | None:
        """Continue from ``path`` or the run's latest checkpoint: ``load_weights(path, trainable)`` restores the
        model, then optimizer, schedule and RNG are restored here. Returns state.json (None: no checkpoint)."""
        path = Path(path) if path is not None else ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return None
        state, opt, trainable = ckpt.read_checkpoint(path)
        if state.get("trainer", "train") != self.name:  # checkpoints of Trainer runs before the name was written
            raise CheckpointError(f"{path} is not a {self.name} checkpoint (written by {state.get('trainer')!r})")
        load_weights(path, trainable)
        if is_fsdp(self.wrapped):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.module, self.optimizer, opt["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        ckpt.set_rng_state(opt["rng"])
        if state.get("world_size", 1) != self.dist.world and self.dist.main:
            print(f"note: {path} was written by {state['world_size']} processes, resuming with {self.dist.world}; "
                  "the data order differs from an uninterrupted run")
        return state

    # -- the run --
    def run(self, owner: Any, total: int, *, config: tuple[str, dict], resume: bool | str | Path = False,
            on_step: Callable[[dict[str, Any]], None] | None = None, show: tuple[str, ...] = ("loss",),
            evaluate: Callable[[], dict[str, float] | None] | None = None,
            eval_every: int = 0) -> tuple[list[dict[str, Any]], Path]:
        """Run ``owner`` (``step``, ``train_step() -> record``, ``save()``, ``resume(path)``) to step ``total``,
        writing ``config`` (file name, contents), metrics.jsonl, checkpoints and loss.png as ``spec`` says, and
        ``evaluate() -> metrics`` at step 0, every ``eval_every`` steps and at the end.
        Returns (this call's records, the last checkpoint)."""
        spec, main = self.spec, self.dist.main
        if main:  # a save killed mid-way leaves a full model copy behind; before resume, which may need a put-back
            for stale in ckpt.remove_stale_temporaries(self.run_dir):
                print(f"note: removed {stale}, left by an interrupted save")
        self.dist.barrier()
        if resume and not owner.resume(None if resume is True else Path(resume)) and main:
            print(f"note: no checkpoint in {self.run_dir}; starting from scratch")
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / config[0]).write_text(json.dumps(config[1], indent=2))
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_until=owner.step, enabled=main)
        from tqdm.auto import tqdm

        # In a log file (CI, nohup) a bar redrawn 10x a second is noise: redraw rarely there.
        bar = tqdm(total=total, initial=owner.step, desc=self.name, unit="step", dynamic_ncols=True,
                   disable=not (main and spec.progress), mininterval=0.2 if sys.stderr.isatty() else 30.0)
        records: list[dict[str, Any]] = []

        def evaluation(announce: bool) -> None:
            values = evaluate() if evaluate is not None else None
            if values is not None:
                records.append(_rounded({"step": owner.step, **values}))
                metrics.write(records[-1])
                if announce and not bar.disable:
                    bar.write(f"step {owner.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))

        last_saved = None
        if owner.step == 0 and eval_every:  # the curve's starting point
            evaluation(announce=False)
        while owner.step < total:
            record = _rounded(owner.train_step())
            records.append(record)
            step = record["step"]
            if step % spec.log_every == 0 or step == total:
                metrics.write(record)
            bar.update(1)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in show if k in record}, refresh=False)
            if eval_every and step % eval_every == 0 and step < total:
                evaluation(announce=True)
            if on_step is not None:
                on_step(record)
            if spec.save_every and step % spec.save_every == 0 and step < total:
                last_saved = owner.save()
        bar.close()
        evaluation(announce=False)
        if last_saved != ckpt.step_dir(self.run_dir, owner.step):
            last_saved = owner.save()
        if main and spec.plot:
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        return records, last_saved


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    """Metrics to 6 decimals (the learning rate as it is)."""
    return {k: round(v, 6) if isinstance(v, float) and k != "lr" else v for k, v in record.items()}


# ---- metrics -----------------------------------------------------------------------------------------
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
    """Training (and validation) loss against step, as a PNG; nothing when no record has a loss."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
