"""Best-of-N rejection sampling: sample N answers per prompt, score them, keep the best as SFT data.

The score comes from a verifiable reward function ``(completion, reference) -> float`` (called through
``safe_reward``, so a failing reward skips that sample instead of the run) or from a trained
``RewardModel``. Ties go to the first sample; prompts whose best score is below ``threshold`` are dropped
and counted. The kept conversations are written as chat JSONL that ``read_chat_jsonl`` / SFT read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lmforge.align.rewards import RewardFn, safe_reward
from lmforge.data.chat import Messages, prompt_messages, validate_messages
from lmforge.data.synthetic import write_jsonl
from lmforge.engine.complete import complete
from lmforge.engine.sequence import SamplingParams
from lmforge.errors import ConfigError, LmforgeError
from lmforge.models.model import Transformer
from lmforge.models.reward import RewardModel


@dataclass
class RejectionConfig:
    n: int = 8  # samples per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    threshold: float | None = None  # drop prompts whose best score is below this
    prompts_per_batch: int = 8  # prompts sampled at once (each gives n sequences)
    seed: int = 0

    def validate(self) -> None:
        for name in ("n", "max_new_tokens", "prompts_per_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"rejection sampling field '{name}' must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError("rejection sampling field 'temperature' must be > 0: best-of-N needs diverse samples")


@dataclass
class PromptResult:
    """Every sample of one prompt with its score (None: the reward could not be computed / empty answer)."""

    messages: Messages
    completions: list[str]
    scores: list[float | None]
    best: int | None  # index into completions, None when no sample could be scored
    kept: bool

    @property
    def best_score(self) -> float | None:
        return None if self.best is None else self.scores[self.best]


@dataclass
class RejectionStats:
    prompts: int = 0
    kept: int = 0
    below_threshold: int = 0  # best score < threshold
    unscorable: int = 0  # no sample of the prompt got a score
    skipped_samples: int = 0  # samples without a score (reward failed, or empty answer)
    mean_best_score: float = math.nan
    results: list[PromptResult] = field(default_factory=list, repr=False)


def sample_completions(model: Transformer, tokenizer, prompts: Sequence[Messages], cfg: RejectionConfig) -> list[list[str]]:
    """``cfg.n`` sampled answers (decoded, cut at EOS) for each chat prompt, through the engine: the n samples
    of a prompt share its KV blocks."""
    cfg.validate()
    encoded = [tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in prompts]
    params = SamplingParams(n=cfg.n, temperature=cfg.temperature, top_k=cfg.top_k or 0, top_p=cfg.top_p or 1.0,
                            max_tokens=cfg.max_new_tokens, seed=cfg.seed)
    outs = complete(model, encoded, params, tokenizer, max_num_seqs=cfg.prompts_per_batch * cfg.n)
    return [[c.text for c in samples] for samples in outs]


def reward_model_scores(rm: RewardModel, tokenizer, messages: Messages, completions: Sequence[str],
                        batch_size: int = 16) -> list[float]:
    """Rewards of ``completions`` as assistant answers to ``messages``."""
    pad_id = tokenizer.pad_id_or_eos
    rows = []
    for c in completions:
        ids = tokenizer.apply_chat_template(list(messages) + [{"role": "assistant", "content": c}])
        # encode_pair feeds the reward model ids[:-1] in training (the last token has no target there);
        # score exactly the inputs it was trained on.
        rows.append(ids[:-1] if len(ids) > 1 else ids)
    scores: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):  # right padding: the reward is read at the last real token
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        scores += rm.score(ids, mask).tolist()
    return scores


def score_completions(tokenizer, record: dict, messages: Messages, completions: Sequence[str],
                      reward_fn: RewardFn | None = None, reward_model: RewardModel | None = None) -> list[float | None]:
    """One score per completion: ``reward_fn(completion, record["answer"])`` (through ``safe_reward``) or the
    reward model's. None marks a sample that must not be used: the reward failed or was NaN/inf, or the
    completion is empty (an empty answer would teach the model to stop at once)."""
    if reward_model is not None:
        raw: list[float | None] = [s if math.isfinite(s) else None
                                   for s in reward_model_scores(reward_model, tokenizer, messages, completions)]
    else:
        reference = str(record.get("answer", ""))
        raw = [safe_reward(reward_fn, c, reference).value for c in completions]
    return [s if c.strip() else None for s, c in zip(raw, completions)]


def _argmax_first(scores: Sequence[float | None]) -> int | None:
    best = None
    for i, s in enumerate(scores):
        if s is not None and (best is None or s > scores[best]):  # strict >: ties keep the first
            best = i
    return best


def best_of_n(model: Transformer, tokenizer, records: Sequence[dict], cfg: RejectionConfig,
              reward_fn: RewardFn | None = None, reward_model: RewardModel | None = None) -> RejectionStats:
    """Sample, score and select for every record ``{"messages": [...], "answer"?: reference}``.

    Exactly one of ``reward_fn`` and ``reward_model`` scores the samples; ``answer`` is the reference
    handed to ``reward_fn`` ("" when absent).
    """
    cfg.validate()
    if (reward_fn is None) == (reward_model is None):
        raise LmforgeError("best_of_n needs exactly one of reward_fn and reward_model")
    prompts = [prompt_messages(r, f"prompt record {i}") for i, r in enumerate(records)]
    samples = sample_completions(model, tokenizer, prompts, cfg)
    stats = RejectionStats(prompts=len(prompts))
    for record, messages, completions in zip(records, prompts, samples):
        scores = score_completions(tokenizer, record, messages, completions, reward_fn, reward_model)
        stats.skipped_samples += sum(s is None for s in scores)
        best = _argmax_first(scores)
        kept = best is not None and (cfg.threshold is None or scores[best] >= cfg.threshold)
        if best is None:
            stats.unscorable += 1
        elif not kept:
            stats.below_threshold += 1
        stats.kept += int(kept)
        stats.results.append(PromptResult(messages, completions, scores, best, kept))
    best_scores = [r.best_score for r in stats.results if r.kept]
    if best_scores:
        stats.mean_best_score = sum(best_scores) / len(best_scores)
    return stats


def sft_records(stats: RejectionStats) -> list[dict]:
    """Kept prompts as SFT chat records, the best answer appended as the assistant turn."""
    out = []
    for r in stats.results:
        if r.kept and r.best is not None:
            messages = list(r.messages) + [{"role": "assistant", "content": r.completions[r.best]}]
            out.append({"messages": validate_messages(messages, "rejection sample", needs_assistant=True)})
    return out


def rejection_sample(model: Transformer, tokenizer, records: Sequence[dict], out_path: str | Path,
                     cfg: RejectionConfig | None = None, reward_fn: RewardFn | None = None,
                     reward_model: RewardModel | None = None) -> RejectionStats:
    """``best_of_n`` then write the kept conversations to ``out_path`` (chat JSONL, atomically)."""
    stats = best_of_n(model, tokenizer, records, cfg or RejectionConfig(), reward_fn, reward_model)
    kept = sft_records(stats)
    if not kept:
        raise LmforgeError(f"rejection sampling kept none of {stats.prompts} prompts "
                           f"({stats.below_threshold} below the threshold, {stats.unscorable} unscorable); "
                           f"nothing written to {out_path}")
    write_jsonl(kept, out_path)
    return stats


__all__ = ["PromptResult", "RejectionConfig", "RejectionStats", "best_of_n",
           "reward_model_scores", "rejection_sample", "sample_completions", "score_completions", "sft_records"]
