"""The on-policy RL loop shared by GRPO and PPO: sample -> score -> minibatch updates, repeated.

A strategy subclasses ``OnPolicyTrainer`` and supplies two methods:

* ``rollout(step) -> Rollout``: sample completions for this rank's prompts of ``step``, score them and
  return row-aligned tensors for the loss (no gradient), the advantages, and stats to log;
* ``objective(outputs, minibatch) -> (loss, stats)``: the differentiable objective on some rows of that
  rollout, a pure function of what the trained module returned for them (the loop runs the forward).

The loop owns the rest: the minibatch updates and the EMA reference model here, and from the training
harness (``train.harness``, shared with ``Trainer``) the device and processes, AdamW + warmup schedule,
clipping, a progress bar, ``metrics.jsonl``, ``loss.png`` and atomic checkpoints (``train.checkpoint``):

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
from lmforge.data.sft import IGNORE_INDEX
from lmforge.engine.complete import complete
from lmforge.engine.sequence import SamplingParams
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.models.model import Transformer
from lmforge.train.harness import Harness
from lmforge.train.recipe import RunSpec


@dataclass
class RLConfig(RunSpec):
    """Fields every on-policy strategy shares (with RunSpec's: seed, device, checkpoints, metrics);
    GRPOConfig and PPOConfig add their own."""

    steps: int = 40
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    lr: float = 1e-4
    warmup_steps: int = 0  # optimizer steps; then constant: the reward, not a schedule, says when to stop
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def validate(self) -> None:
        kind = type(self).__name__.removesuffix("Config")
        for name in ("steps", "max_new_tokens", "keep_checkpoints", "log_every"):
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
    """The loop; see the module docstring. Subclasses set ``name`` and implement ``rollout`` and ``objective``.

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
        self.harness = Harness(out_dir, cfg, self.name)
        self.out_dir, self.device, self.dist = self.harness.run_dir, self.harness.device, self.harness.dist
        world = self.dist.world
        for what, n in (("prompts per step", prompts_per_step), ("minibatch size", minibatch)):
            if n is not None and n % world:
                raise ConfigError(f"{label}: {what} ({n}) must be divisible by the number of processes ({world})")
        self.model = model.to(self.device)
        self.module = (module or model).to(self.device)
        self.extra_modules = extra_modules or {}
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if reference else None
        self.ref_ema = ref_ema or None
        self.epochs = epochs
        self.minibatch = None if minibatch is None else minibatch // world
        # Linear warmup over ``warmup_steps`` optimizer steps, then constant (the default min_lr_ratio 1).
        self.wrapped = self.harness.prepare(self.module, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay,
                                            warmup=cfg.warmup_steps)
        self.optimizer, self.scheduler = self.harness.optimizer, self.harness.scheduler
        self.prompts_per_rank = prompts_per_step // world
        # Rank r takes its slice of the same global batch one process would take: runs stay comparable.
        self.sampler = StepSampler(len(prompts), self.prompts_per_rank, seed=cfg.seed, rank=self.dist.rank,
                                   world_size=world, drop_last=False)
        self.encoded = [tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True) for p in prompts]
        self.pad_id = tokenizer.pad_id_or_eos
        self.step = 0
        self.skipped = 0  # samples whose reward could not be computed, on this rank

    # -- what a strategy supplies --
    def rollout(self, step: int) -> Rollout:
        raise NotImplementedError

    def objective(self, outputs: Any, minibatch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """``outputs``: what the trained module returned for ``minibatch`` (rows of ``Rollout.batch`` plus their
        ``advantages``). Returns the loss to minimise (a mean over the minibatch; DDP averages it over ranks)
        and detached stats to log."""
        raise NotImplementedError

    def forward_kwargs(self, minibatch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Extra keyword arguments for the trained module's forward on ``minibatch`` (e.g. ``logits_to_keep``)."""
        return {}

    def loss(self, minibatch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The forward of the trained module on ``minibatch``, then ``objective``. The minibatch's all-padding
        tail columns (rows are right-padded) are dropped first: less work, the same result."""
        width = int(minibatch["attention_mask"].sum(-1).max())
        mb = {k: v[:, :width] if v.dim() == 2 else v for k, v in minibatch.items()}
        return self.objective(self.forward_rows(mb, **self.forward_kwargs(mb)), mb)

    def forward_rows(self, batch: dict[str, torch.Tensor], module: nn.Module | None = None, **kwargs: Any) -> Any:
        """``harness.forward`` on right-padded rows (every row: its real tokens, then padding), without the
        padding mask. Under the causal mask alone a real token attends only to the real tokens before it and
        keeps its position, so its output is what the masked forward gives; only the padding positions' outputs
        change, and nothing reads them (their labels are IGNORE_INDEX). SDPA then takes its causal fast path."""
        return self.harness.forward({"input_ids": batch["input_ids"],
                                     "attention_mask": torch.ones_like(batch["attention_mask"])}, module, **kwargs)

    # -- helpers for rollouts --
    def prompts_of(self, step: int, repeat: int = 1) -> tuple[list[int], list[list[int]], list[str | None]]:
        """This rank's prompt indices for ``step``, and their token ids and answers, each row ``repeat`` times."""
        chosen = self.sampler.indices(step)
        ids = [self.encoded[i] for i in chosen for _ in range(repeat)]
        answers = [self.prompts[i].get("answer") for i in chosen for _ in range(repeat)]
        return chosen, ids, answers

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], step: int) -> tuple[list[list[int]], list[bool], float]:
        """Completions (cut after EOS), whether each ended with EOS, and the seconds sampling took. Through the
        engine: a prompt repeated for a group is prefilled once and its KV blocks shared."""
        cfg = self.cfg
        t0 = time.perf_counter()
        # Seeded by (seed, step, rank): resume replays the same samples, and ranks draw different ones.
        seed = ((cfg.seed * 100_003 + step) * self.dist.world + self.dist.rank) * 1_000_003
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p or 1.0, max_tokens=cfg.max_new_tokens,
                                seed=seed)
        outs = complete(self.model, prompts, params, self.tokenizer)
        seconds = time.perf_counter() - t0
        cut = [cut_at_eos(samples[0].token_ids, self.tokenizer.eos_ids) for samples in outs]
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
            stats["grad_norm"] = self.harness.optimizer_step(self.cfg.grad_clip, f"{self.name} step {step + 1}")
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

        state = {"skipped_rewards": int(self.dist.sum(self.skipped, self.device)), "config": asdict(self.cfg)}
        return self.harness.save(self.step, lambda tmp: save_model(self.model, tmp / "model", tokenizer=self.tokenizer),
                           self._extra_state() or None, state)

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from ``path`` or the run's latest checkpoint; False when there is none. The trainer must
        be built as for the original run (same starting model: it is the frozen reference)."""
        state = self.harness.resume(path, self._load_weights)
        if state is None:
            return False
        self.step = int(state["step"])
        # The count is global; rank 0 carries it so the sum over ranks stays right.
        self.skipped = int(state.get("skipped_rewards", 0)) if self.dist.main else 0
        return True

    def _load_weights(self, path: Path, extra: dict[str, torch.Tensor] | None) -> None:
        from lmforge.models.checkpoint import load_model

        modules, extra = self._saved_modules(), extra or {}
        want = {f"{name}.{k}" for name, m in modules.items() for k in m.state_dict()}
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

    # -- the run --
    def train_step(self) -> dict[str, Any]:
        """Rollout, update, reference step; the step's record (stats averaged over ranks)."""
        step = self.step
        rollout = self.rollout(step)
        upd = self.update(rollout, step)
        self.update_reference()
        self.step = step + 1
        return {"step": self.step, **self._reduce({**rollout.stats, **upd}),
                "skipped_rewards": int(self.dist.sum(self.skipped, self.device)),
                "lr": self.scheduler.get_last_lr()[0]}

    def fit(self, resume: bool | str | Path = False,
            on_step: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Run to ``cfg.steps``; returns this call's per-step records (as written to metrics.jsonl)."""
        history, _ = self.harness.run(self, self.cfg.steps, config=(f"{self.name}_config.json", asdict(self.cfg)),
                                resume=resume, on_step=None if on_step is None else (lambda r: on_step(r["step"], r)),
                                show=("reward", "kl", "rollout_tok_s", "update_tok_s"))
        return history


__all__ = ["OnPolicyTrainer", "RLConfig", "Rollout", "cut_at_eos"]
