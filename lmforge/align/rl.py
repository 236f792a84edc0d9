"""The on-policy RL loop shared by GRPO and PPO: sample -> score -> minibatch updates, repeated.

A strategy subclasses ``OnPolicyTrainer`` and supplies two methods:

* ``rollout(step) -> Rollout``: sample completions for this rank's prompts of ``step``, score them and
  return row-aligned tensors for the loss (no gradient), the advantages, and stats to log;
* ``loss(minibatch) -> (loss, stats)``: the differentiable objective on some rows of that rollout.

The loop owns the rest, built from the training engine's parts: AdamW + warmup schedule
(``lr_multiplier``), gradient clipping, the EMA reference model, a progress bar, ``metrics.jsonl``
(``MetricsLog``) and ``loss.png`` (``plot_metrics``), and atomic checkpoints (``train.checkpoint``):

  model/                  the policy, HF format (loadable by itself)
  trainable.safetensors   what the HF directory cannot hold: value head, EMA reference (when present)
  optimizer.pt            optimizer, LR schedule and torch RNG state (tensors only, loaded weights_only)
  state.json              step, skipped-reward count, world size, config

Exact resume: everything random is a function of ``(seed, step)`` -- which prompts (``StepSampler``), the
sampling generator, the minibatch order -- or saved (the torch RNG), so a resumed run continues the same
curve. Under ``torchrun`` each rank takes a disjoint slice of the step's prompts, the trained module is
wrapped in DDP (which averages gradients over ranks in ``backward``; so a minibatch's loss is the mean of
the ranks' means), stats are averaged over ranks (throughputs summed), and rank 0 writes the files.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from lmforge.align.rewards import RewardFn, safe_reward
from lmforge.data.sampler import StepSampler
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.models.generate import generate, left_pad
from lmforge.models.model import Transformer
from lmforge.train import checkpoint as ckpt
from lmforge.train.objectives import IGNORE_INDEX
from lmforge.train.trainer import (MetricsLog, lr_multiplier, pick_device, plot_metrics, read_metrics,
                                   setup_distributed)


@dataclass
class RLConfig:
    """Fields every on-policy strategy shares; GRPOConfig and PPOConfig add their own."""

    steps: int = 40
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    lr: float = 1e-4
    warmup_steps: int = 0  # optimizer steps; then constant: the reward, not a schedule, says when to stop
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 50  # checkpoint every N steps, and always at the end
    keep_checkpoints: int = 2
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when there is a GPU, else cpu
    progress: bool = True

    def validate(self) -> None:
        kind = type(self).__name__.removesuffix("Config")
        for name in ("steps", "max_new_tokens", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{kind} field '{name}' must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{kind} field '{name}' must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"{kind} field 'lr' must be > 0, got {self.lr}")
        if self.temperature <= 0:
            raise ConfigError(f"{kind} field 'temperature' must be > 0: on-policy RL learns from sampled "
                              "completions, and greedy decoding explores nothing")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"{kind} field 'top_p' must be in (0, 1], got {self.top_p}")


class Rollout(NamedTuple):
    """One step's experience on this rank. ``batch`` tensors are row-aligned (first dim = completions) and
    hold at least ``input_ids``, ``labels`` (IGNORE_INDEX off the completion) and ``attention_mask``;
    ``advantages`` is ``[rows]`` (GRPO) or ``[rows, T]`` (PPO)."""

    batch: dict[str, torch.Tensor]
    advantages: torch.Tensor
    stats: dict[str, float]


def cut_at_eos(row: list[int], eos_ids: list[int]) -> tuple[list[int], bool]:
    """The completion up to and including its first EOS, and whether it had one (False: truncated)."""
    for j, t in enumerate(row):
        if t in eos_ids:
            return row[: j + 1], True  # keep the EOS: ending the answer is part of what is learned
    return row, False


class OnPolicyTrainer:
    """The loop; see the module docstring. Subclasses set ``name`` and implement ``rollout`` and ``loss``.

    ``module`` is what is trained (default ``model``; PPO passes the policy with its value head), and
    ``extra_modules`` are parts of it that the policy's HF directory does not hold, saved in checkpoints.
    ``prompts_per_step`` and ``minibatch`` count all ranks together (each rank takes 1/world of them).
    ``epochs`` passes over each rollout, in shuffled minibatches of ``minibatch`` rows (None: all rows
    at once, in order). ``ref_ema``: after every step ``ref <- ema * ref + (1 - ema) * policy``;
    0 or None keeps the reference frozen at the starting policy.
    """

    name = "rl"

    def __init__(self, model: Transformer, tokenizer: Any, prompts: list[dict], cfg: RLConfig, out_dir: str | Path,
                 *, prompts_per_step: int, module: nn.Module | None = None,
                 extra_modules: dict[str, nn.Module] | None = None, reference: bool = False,
                 ref_ema: float | None = None, epochs: int = 1, minibatch: int | None = None,
                 needs_answer: bool = True) -> None:
        label = self.name.upper()
        if not prompts:
            raise LmforgeError(f"{label} needs at least one prompt")
        need = ("messages", "answer") if needs_answer else ("messages",)
        for i, p in enumerate(prompts):
            if not isinstance(p, dict) or any(k not in p for k in need):
                raise LmforgeError(f"prompt record {i} needs {' and '.join(repr(k) for k in need)}")
        self.cfg, self.tokenizer, self.prompts = cfg, tokenizer, prompts
        self.out_dir = Path(out_dir)
        self.device = pick_device(cfg.device)
        self.dist = setup_distributed(self.device)
        world = self.dist.world
        for what, n in (("prompts per step", prompts_per_step), ("minibatch size", minibatch)):
            if n is not None and n % world:
                raise ConfigError(f"{label}: {what} ({n}) must be divisible by the number of processes ({world})")
        self.model = model.to(self.device)
        self.module = (module or model).to(self.device)
        self.extra_modules = extra_modules or {}
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if reference else None
        self.ref_ema = ref_ema or None
        self.wrapped = self._wrap(self.module)
        self.epochs = epochs
        self.minibatch = None if minibatch is None else minibatch // world
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise LmforgeError("nothing to train: every parameter of the model is frozen")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        # Linear warmup over ``warmup_steps`` optimizer steps, then constant (min ratio 1: no decay).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, 1, 1.0))
        self.prompts_per_rank = prompts_per_step // world
        # Rank r takes its slice of the same global batch one process would take: runs stay comparable.
        self.sampler = StepSampler(len(prompts), self.prompts_per_rank, seed=cfg.seed, rank=self.dist.rank,
                                   world_size=world, drop_last=False)
        self.encoded = [tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True) for p in prompts]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_ids[0]
        self.step = 0
        self.skipped = 0  # samples whose reward could not be computed, on this rank

    # -- what a strategy supplies --
    def rollout(self, step: int) -> Rollout:
        raise NotImplementedError

    def loss(self, minibatch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """``minibatch``: rows of ``Rollout.batch`` plus their ``advantages``. Returns the loss to minimise
        (a mean over the minibatch; DDP averages it over ranks) and detached stats to log."""
        raise NotImplementedError

    # -- helpers for rollouts --
    def prompts_of(self, step: int, repeat: int = 1) -> tuple[list[int], list[list[int]], list[str | None]]:
        """This rank's prompt indices for ``step``, and their token ids and answers, each row ``repeat`` times."""
        chosen = self.sampler.indices(step)
        ids = [self.encoded[i] for i in chosen for _ in range(repeat)]
        answers = [self.prompts[i].get("answer") for i in chosen for _ in range(repeat)]
        return chosen, ids, answers

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], step: int) -> tuple[list[list[int]], list[bool], float]:
        """Completions (cut after EOS), whether each ended with EOS, and the seconds sampling took."""
        cfg = self.cfg
        ids, mask = left_pad(prompts, self.pad_id)
        self.model.eval()
        t0 = time.perf_counter()
        # Seeded by (seed, step, rank): resume replays the same samples, and ranks draw different ones.
        seed = (cfg.seed * 100_003 + step) * self.dist.world + self.dist.rank
        out = generate(self.model, ids, mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       top_p=cfg.top_p, eos_ids=self.tokenizer.eos_ids, seed=seed)
        seconds = time.perf_counter() - t0
        cut = [cut_at_eos(row, self.tokenizer.eos_ids) for row in out.tolist()]
        return [c for c, _ in cut], [ended for _, ended in cut], seconds

    def rewards_from_fn(self, fn: RewardFn, completions: list[list[int]], answers: list[str | None],
                        skip: list[bool] | None = None) -> torch.Tensor:
        """``fn(text, answer)`` per completion through ``safe_reward``: NaN (and a logged, counted skip) where
        it raised or returned a non-finite value. Rows flagged in ``skip`` are not scored (NaN, not counted)."""
        out = []
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            if skip is not None and skip[i]:
                out.append(math.nan)
                continue
            outcome = safe_reward(fn, self.tokenizer.decode(completion), answer)
            if outcome.value is None:
                self.skipped += 1
            out.append(math.nan if outcome.value is None else outcome.value)
        return torch.tensor(out, dtype=torch.float32)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- the update --
    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.dist.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _minibatches(self, rows: int, step: int) -> Iterator[torch.Tensor | slice]:
        if self.minibatch is None or self.minibatch >= rows:
            for _ in range(self.epochs):
                yield slice(None)
            return
        for epoch in range(self.epochs):
            g = torch.Generator().manual_seed((self.cfg.seed * 100_003 + step) * 1_000 + epoch)
            order = torch.randperm(rows, generator=g)
            yield from order.split(self.minibatch)

    def update(self, rollout: Rollout, step: int) -> dict[str, float]:
        """``epochs`` passes of optimizer steps over ``rollout``; mean stats over them, and update tokens/s."""
        units = self.dist.sum(int((rollout.batch["labels"] != IGNORE_INDEX).sum()), self.device)
        batches = list(self._minibatches(rollout.advantages.shape[0], step))
        if units == 0:  # every sample was skipped: an update would be driven by Adam's momentum alone
            print(f"{self.name} step {step + 1}: no sample has a usable reward; skipping the update", file=sys.stderr)
            return {"update_skipped": 1.0}
        self.wrapped.train()
        sums: dict[str, float] = {}
        tokens = 0
        t0 = time.perf_counter()
        for idx in batches:
            mb = {k: v[idx] for k, v in rollout.batch.items()}
            mb["advantages"] = rollout.advantages[idx]
            loss, stats = self.loss(mb)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad],
                                                  self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
            if not torch.isfinite(norm):  # the same on every rank: gradients are all-reduced by now
                raise LmforgeError(f"{self.name} step {step + 1}: the loss or its gradient is not finite "
                                   f"(loss {float(loss.detach()):.4g}); stopping before the update corrupts the weights")
            stats["grad_norm"] = norm
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            tokens += int(mb["attention_mask"].sum())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        out = {k: v / len(batches) for k, v in sums.items()}
        out["update_tok_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
        return out

    @torch.no_grad()
    def update_reference(self) -> None:
        """EMA step of the reference toward the policy: ``ref <- ema * ref + (1 - ema) * policy``."""
        if self.reference is None or not self.ref_ema:
            return
        for ref, cur in zip(self.reference.parameters(), self.model.parameters()):
            ref.lerp_(cur.detach(), 1.0 - self.ref_ema)

    def _reduce(self, stats: dict[str, float]) -> dict[str, float]:
        """Mean over ranks (throughputs ``*_tok_s`` summed: the whole job's rate)."""
        if self.dist.world == 1:
            return stats
        keys = sorted(stats)
        t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) if k.endswith("_tok_s") else float(v) / self.dist.world for k, v in zip(keys, t.tolist())}

    # -- checkpoints --
    def _saved_modules(self) -> dict[str, nn.Module]:
        """Modules whose weights go to trainable.safetensors (the policy itself is the HF model/ dir)."""
        modules = dict(self.extra_modules)
        if self.reference is not None and self.ref_ema:  # a frozen reference is the starting model: not saved
            modules["reference"] = self.reference
        return modules

    def _extra_state(self) -> dict[str, torch.Tensor]:
        # clone: tied weights would otherwise share storage, which safetensors refuses
        return {f"{name}.{k}": v.detach().clone()
                for name, m in self._saved_modules().items() for k, v in m.state_dict().items()}

    def save(self) -> Path:
        """Checkpoint the run at ``self.step`` (atomically; rank 0 writes, every rank must call)."""
        from lmforge.models.checkpoint import save_model

        skipped = int(self.dist.sum(self.skipped, self.device))
        path = ckpt.step_dir(self.out_dir, self.step)
        if self.dist.main:
            optimizer_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                               "rng": ckpt.rng_state()}
            state = {"trainer": self.name, "step": self.step, "skipped_rewards": skipped,
                     "world_size": self.dist.world, "config": asdict(self.cfg)}

            def write_model(tmp: Path) -> None:
                save_model(self.model, tmp / "model", tokenizer=self.tokenizer)

            ckpt.write_checkpoint(self.out_dir, self.step, write_model=write_model,
                                  trainable=self._extra_state() or None, optimizer_state=optimizer_state, state=state,
                                  keep=self.cfg.keep_checkpoints)
        self.dist.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from ``path`` or the run's latest checkpoint; False when there is none. The trainer must
        be built as for the original run (same starting model: it is the frozen reference)."""
        from lmforge.models.checkpoint import load_model

        path = Path(path) if path is not None else ckpt.latest_checkpoint(self.out_dir)
        if path is None:
            return False
        state, opt, extra = ckpt.read_checkpoint(path)
        if state.get("trainer") != self.name:
            raise CheckpointError(f"{path} is not a {self.name} checkpoint (written by {state.get('trainer')!r})")
        modules = self._saved_modules()
        want = {f"{name}.{k}" for name, m in modules.items() for k in m.state_dict()}
        extra = extra or {}
        if set(extra) != set(want):
            missing, unexpected = sorted(set(want) - set(extra)), sorted(set(extra) - set(want))
            raise CheckpointError(f"{path} does not match this run's setup (missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]}); was it written with another value head or ref_ema?")
        policy = load_model(path / "model", dtype=torch.float32).state_dict()
        with torch.no_grad():
            for name, p in self.model.state_dict().items():
                p.copy_(policy[name])
            for name, module in modules.items():
                for k, p in module.state_dict().items():
                    p.copy_(extra[f"{name}.{k}"])
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        ckpt.set_rng_state(opt["rng"])
        self.step = int(state["step"])
        # The count is global; rank 0 carries it so the sum over ranks stays right.
        self.skipped = int(state.get("skipped_rewards", 0)) if self.dist.main else 0
        if state.get("world_size", 1) != self.dist.world and self.dist.main:
            print(f"note: {path} was written by {state['world_size']} processes, resuming with {self.dist.world}; "
                  "the samples differ from an uninterrupted run")
        return True

    # -- the run --
    def fit(self, resume: bool | str | Path = False,
            on_step: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Run to ``cfg.steps``; returns this call's per-step records (as written to metrics.jsonl)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if resume:
            found = self.resume(None if resume is True else resume)
            if not found and self.dist.main:
                print(f"note: no checkpoint in {self.out_dir}; starting from scratch")
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / f"{self.name}_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        metrics = MetricsLog(self.out_dir / "metrics.jsonl", keep_until=self.step, enabled=self.dist.main)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True,
                   disable=not (self.dist.main and cfg.progress), mininterval=0.2 if sys.stderr.isatty() else 30.0)
        history, last_saved = [], None
        while self.step < cfg.steps:
            step = self.step
            rollout = self.rollout(step)
            upd = self.update(rollout, step)
            self.update_reference()
            self.step = step + 1
            stats = self._reduce({**rollout.stats, **upd})
            record = {"step": self.step, **{k: round(v, 6) for k, v in stats.items()},
                      "skipped_rewards": int(self.dist.sum(self.skipped, self.device)),
                      "lr": self.scheduler.get_last_lr()[0]}
            metrics.write(record)
            history.append(record)
            bar.update(1)
            bar.set_postfix(reward=f"{record.get('reward', math.nan):.3f}", kl=f"{record.get('kl', math.nan):.4f}",
                            rollout_tok_s=f"{record.get('rollout_tok_s', 0):.0f}",
                            update_tok_s=f"{record.get('update_tok_s', 0):.0f}", refresh=False)
            if on_step is not None:
                on_step(self.step, record)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                last_saved = self.save()
        bar.close()
        if last_saved is None or last_saved != ckpt.step_dir(self.out_dir, self.step):
            self.save()
        if self.dist.main and any("loss" in r for r in read_metrics(self.out_dir / "metrics.jsonl")):
            plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
        return history


__all__ = ["OnPolicyTrainer", "RLConfig", "Rollout", "cut_at_eos"]
