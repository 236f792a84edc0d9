"""Activation patching: run a corrupted prompt, put back one activation from the clean prompt, and measure.

Where restoring a clean activation moves the metric back toward its clean value, that activation carries
the information the corruption removed (Meng et al. 2022; Wang et al. 2022). The prompts must be
token-aligned (same length), as TransformerLens's ``patching`` module requires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.interp.hooks import as_token_batch, patch_positions, run_with_cache
from lmforge.models.model import Hook, Transformer

Metric = Callable[[Tensor], "Tensor | float"]  # logits [B, T, vocab] -> a scalar

# Per layer x position: the residual stream and the sub-layer outputs. Per layer x head: "attn_head" (hook_z,
# one head's output at every position).
POSITION_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_POINTS = ("attn_head",)


def logit_diff_metric(answer: int, wrong: int, position: int = -1) -> Metric:
    """``logit[answer] - logit[wrong]`` at ``position``, averaged over the batch: the usual patching metric."""

    def logit_diff(logits: Tensor) -> Tensor:
        return (logits[:, position, answer] - logits[:, position, wrong]).float().mean()

    return logit_diff


def metric_value(model: Transformer, ids: Tensor | Sequence[int], metric: Metric,
                 attention_mask: Tensor | None = None) -> float:
    """``metric`` of an unpatched run (the clean and corrupted baselines)."""
    with torch.no_grad():
        return float(metric(model(as_token_batch(model, ids), attention_mask)))


def activation_patching(model: Transformer, clean_ids: Tensor | Sequence[int], corrupted_ids: Tensor | Sequence[int],
                        metric: Metric, what: str = "resid_pre", attention_mask: Tensor | None = None) -> Tensor:
    """``metric`` of the corrupted run with one clean activation patched in, for every place ``what`` names:

    - one of ``POSITION_POINTS`` (e.g. "resid_pre"): [layers, positions], the point ``blocks.{l}.hook_<what>``
      at one position at a time;
    - "attn_head": [layers, heads], head h's output (``attn.hook_z``) at every position (NaN past a layer's
      head count).

    ``attention_mask`` (padding) applies to both prompts. Each entry is one forward pass of the corrupted
    prompt. Compare with ``metric_value`` of the clean and corrupted prompts to normalise.
    """
    clean, corrupted = as_token_batch(model, clean_ids), as_token_batch(model, corrupted_ids)
    if clean.shape != corrupted.shape:
        raise LmforgeError(f"the clean and corrupted prompts must be token-aligned: {tuple(clean.shape)} tokens vs "
                           f"{tuple(corrupted.shape)}; patching puts position p of one into position p of the other")
    n, t = model.config.num_layers, clean.shape[1]
    if what in POSITION_POINTS:
        names = [f"blocks.{i}.hook_{what}" for i in range(n)]
    elif what in HEAD_POINTS:
        names = [f"blocks.{i}.attn.hook_z" for i in range(n)]
    else:
        raise LmforgeError(f"cannot patch {what!r}; choose one of {', '.join(POSITION_POINTS + HEAD_POINTS)}")
    _, cache = run_with_cache(model, clean, names=names, attention_mask=attention_mask)

    def corrupted_metric(name: str, hook: Hook) -> float:
        with torch.no_grad():
            return float(metric(model(corrupted, attention_mask, hooks={name: hook})))

    if what in POSITION_POINTS:
        result = torch.zeros(n, t)
        for i, name in enumerate(names):
            for p in range(t):
                result[i, p] = corrupted_metric(name, patch_positions(cache[name], [p]))
        return result
    heads = [block.self_attn.n_heads for block in model.model.layers]
    result = torch.full((n, max(heads)), float("nan"))
    for i, name in enumerate(names):
        for h in range(heads[i]):
            result[i, h] = corrupted_metric(name, _patch_head(cache[name], h))
    return result


def _patch_head(source: Tensor, head: int) -> Hook:
    """A hook writing head ``head`` of ``source`` [B, T, H, D] into the activation, every position."""

    def patch(x: Tensor, name: str) -> Tensor:
        out = x.clone()
        out[:, :, head] = source[:, :, head].to(x.dtype)
        return out

    return patch
