"""Batched next-token sampling: penalties, temperature, top-k / top-p / min-p, per-request seeds, logprobs.

Every row carries its own settings, so one call serves a batch of unrelated requests. Seeded rows draw
from their own ``torch.Generator``: their samples do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.engine.sequence import Sequence
from lmforge.models.sampling import filter_logits


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[float] | None  # of the chosen tokens (None when no row asked)
    top_logprobs: list[dict[int, float]] | None


def apply_penalties(logits: Tensor, prompt_ids: list[list[int]], output_ids: list[list[int]],
                    repetition: Tensor, frequency: Tensor, presence: Tensor) -> Tensor:
    """Penalised copy of ``logits`` [B, V]; the penalty tensors are [B].

    repetition (CTRL / HF): logit / r if logit > 0 else logit * r, for tokens seen in prompt or output.
    frequency / presence (OpenAI): logit - f * count - p * (count > 0), counts over the output only.
    """
    b, v = logits.shape
    device = logits.device
    counts = torch.zeros(b, v, device=device)
    seen = torch.zeros(b, v, dtype=torch.bool, device=device)
    for row, (p, o) in enumerate(zip(prompt_ids, output_ids)):
        if o:
            counts[row].index_add_(0, torch.tensor(o, device=device), torch.ones(len(o), device=device))
        if p:
            seen[row, torch.tensor(p, device=device)] = True
    seen |= counts > 0
    logits = logits.clone()
    r = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).float()


class Sampler:
    def __call__(self, logits: Tensor, seqs: list[Sequence], raw_logits: Tensor | None = None) -> SampleResult:
        """One new token per row of ``logits`` [B, V] (float32), row i belonging to ``seqs[i]``.

        ``raw_logits``: the model's distribution before output constraints masked ``logits``; logprobs
        are reported from it (default: ``logits``).
        """
        device = logits.device
        params = [s.params for s in seqs]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw = logits if raw_logits is None else raw_logits
        f32 = dict(device=device, dtype=torch.float32)
        if any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in params):
            logits = apply_penalties(
                logits, [s.prompt_ids if s.params.repetition_penalty != 1.0 else [] for s in seqs],
                [s.output_ids for s in seqs],
                torch.tensor([p.repetition_penalty for p in params], **f32),
                torch.tensor([p.frequency_penalty for p in params], **f32),
                torch.tensor([p.presence_penalty for p in params], **f32))
        greedy = logits.argmax(-1)
        tokens = greedy
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=device)
            sub = [params[i] for i in sampled_rows]
            x = logits[rows] / torch.tensor([p.temperature for p in sub], **f32)[:, None]
            if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sub):
                x = filter_logits(x, torch.tensor([max(p.top_k, 0) for p in sub], device=device),
                                  torch.tensor([p.top_p for p in sub], **f32),
                                  torch.tensor([p.min_p for p in sub], **f32))
            probs = x.softmax(-1)
            # Inverse CDF: one uniform per row from that row's own generator (not one draw per vocabulary entry),
            # the first token whose cumulative probability exceeds it; right=True never lands on a filtered
            # (zero-probability) token, whose cumulative sum equals its predecessor's.
            u = torch.empty(len(sampled_rows), 1, **f32)
            for j, i in enumerate(sampled_rows):
                u[j] = torch.rand(1, generator=seqs[i].generator, device=device)
            cdf = probs.cumsum(-1)
            chosen = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)
            tokens = tokens.clone()
            tokens[rows] = chosen.squeeze(-1)
        out = tokens.tolist()
        if not want_logprobs:
            return SampleResult(out, None, None)
        logp = torch.log_softmax(raw, dim=-1)
        chosen = logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()
        top: list[dict[int, float]] = []
        k_max = max(p.logprobs or 0 for p in params)
        if k_max:
            values, ids = logp.topk(k_max, dim=-1)
            values, ids = values.tolist(), ids.tolist()
        for i, p in enumerate(params):
            k = p.logprobs or 0
            top.append({ids[i][j]: values[i][j] for j in range(k)} if k else {})
        return SampleResult(out, chosen, top)
