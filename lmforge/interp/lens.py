"""What the residual stream says about the next token: the logit lens and direct logit attribution."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.interp.hooks import as_token_batch, run_with_cache
from lmforge.models.model import RMSNorm, Transformer


def _one_prompt(model: Transformer, ids: Tensor | Sequence[int]) -> Tensor:
    ids = as_token_batch(model, ids)
    if ids.shape[0] != 1:
        raise LmforgeError(f"pass one prompt ([T] or [1, T]), got a batch of {ids.shape[0]}")
    return ids


def _check_token(model: Transformer, token: int, what: str) -> int:
    if not 0 <= int(token) < model.config.vocab_size:
        raise LmforgeError(f"{what} token id {token} is outside the vocabulary (0..{model.config.vocab_size - 1})")
    return int(token)


# ---- logit lens ------------------------------------------------------------------------------------
@dataclass
class LogitLens:
    """The residual stream after each layer, read through the final norm and unembedding.

    Row r is ``labels[r]``: "embed" (the input to layer 0), then "L{i}" (the output of layer i); the last row
    is the model's own prediction. Per row and position: the ``top_ids``/``top_probs`` [R, T, k] and, with a
    target, its probability ``target_probs`` and rank ``target_ranks`` (0 = top) [R, T].
    """

    labels: list[str]
    top_ids: Tensor
    top_probs: Tensor
    target: int | None = None
    target_probs: Tensor | None = None
    target_ranks: Tensor | None = None


def residual_streams(model: Transformer, ids: Tensor) -> tuple[Tensor, list[str], Tensor]:
    """(logits [1, T, V], labels, the residual stream before layer 0 and after every layer [L + 1, 1, T, d])."""
    n = model.config.num_layers
    names = ["blocks.0.hook_resid_pre", *(f"blocks.{i}.hook_resid_post" for i in range(n))]
    logits, cache = run_with_cache(model, ids, names=names)
    return logits, ["embed", *(f"L{i}" for i in range(n))], torch.stack([cache[name] for name in names])


def logit_lens(model: Transformer, ids: Tensor | Sequence[int], target: int | None = None,
               top_k: int = 5) -> LogitLens:
    """Logit lens (nostalgebraist 2020) of one prompt: each layer's residual stream through the final norm and
    the unembedding (Gemma's soft-cap included), per position, as next-token probabilities."""
    ids = _one_prompt(model, ids)
    if target is not None:
        target = _check_token(model, target, "target")
    _, labels, resid = residual_streams(model, ids)
    top_ids, top_probs, target_probs, target_ranks = [], [], [], []
    with torch.no_grad():
        for stream in resid:  # one layer at a time: [T, vocab] each, not [L, T, vocab] at once
            probs = torch.softmax(model.unembed(model.model.norm(stream[0])).float(), dim=-1)
            values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
            top_ids.append(indices)
            top_probs.append(values)
            if target is not None:
                p = probs[:, target]
                target_probs.append(p)
                target_ranks.append((probs > p[:, None]).sum(-1))
    lens = LogitLens(labels, torch.stack(top_ids).cpu(), torch.stack(top_probs).cpu(), target)
    if target is not None:
        lens.target_probs, lens.target_ranks = torch.stack(target_probs).cpu(), torch.stack(target_ranks).cpu()
    return lens


# ---- direct logit attribution -----------------------------------------------------------------------
@dataclass
class LogitAttribution:
    """Each component's direct effect on ``logit[answer] - logit[wrong]`` (or on ``logit[answer]``) at one position.

    ``layers`` [L, 2]: attention and MLP output of each layer; ``heads`` [L, H]: each head's share of its
    layer's attention output (NaN past a layer's head count); ``embed``: the embeddings' (positional included);
    ``bias``: what no component carries (the final LayerNorm's bias). ``embed + layers.sum() + bias`` is
    ``total`` under the approximation; ``total`` is the model's actual (pre-soft-cap) value.
    ``attn_bias`` [L]: the attention output bias, in ``layers[:, 0]`` but in no head.
    """

    answer: int
    wrong: int | None
    position: int
    embed: float
    layers: Tensor
    heads: Tensor
    attn_bias: Tensor
    bias: float
    total: float

    APPROXIMATION = ("The final norm divides the whole residual stream by one scale; like TransformerLens's "
                     "apply_ln_to_stack, that scale (and Gemma 2's post-attention norm scale, for heads) is "
                     "frozen at its value on this run, so each component's effect on the logit is linear. "
                     "Gemma 2's final logit soft-cap is left out.")


def frozen_norm(norm: nn.Module, reference: Tensor) -> Callable[[Tensor], Tensor]:
    """The norm made linear at ``reference`` [..., d]: its scale (1/std or 1/rms) fixed to the reference's, its
    bias dropped, so a sum of components maps to the sum of their images (plus the bias, once)."""
    x = reference.float()
    if isinstance(norm, RMSNorm):
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
        weight = norm.weight.float() + 1.0 if norm.unit_offset else norm.weight.float()
        return lambda c: c.float() * scale * weight
    if isinstance(norm, nn.LayerNorm):
        scale = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
        weight = norm.weight.float() if norm.weight is not None else 1.0
        return lambda c: (c.float() - c.float().mean(-1, keepdim=True)) * scale * weight
    raise LmforgeError(f"direct logit attribution does not know the norm {type(norm).__name__}")


@torch.no_grad()
def direct_logit_attribution(model: Transformer, ids: Tensor | Sequence[int], answer: int,
                             wrong: int | None = None, position: int = -1) -> LogitAttribution:
    """Direct logit attribution of one prompt at ``position``: how much each layer's attention and MLP output,
    and each attention head, adds straight to ``logit[answer] - logit[wrong]`` (``logit[answer]`` without
    ``wrong``) through the final norm and the unembedding. See ``LogitAttribution.APPROXIMATION``."""
    ids = _one_prompt(model, ids)
    answer = _check_token(model, answer, "answer")
    wrong = None if wrong is None else _check_token(model, wrong, "wrong")
    t = ids.shape[1]
    if not -t <= position < t:
        raise LmforgeError(f"position {position} is outside the prompt's {t} tokens")
    position %= t
    n = model.config.num_layers
    names = {"hook_embed", "hook_pos_embed", f"blocks.{n - 1}.hook_resid_post"}
    for i in range(n):
        names |= {f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out", f"blocks.{i}.attn.hook_z"}
    logits, cache = run_with_cache(model, ids, names=lambda name: name in names)
    unembed = model.lm_head.weight.float()
    direction = unembed[answer] - unembed[wrong] if wrong is not None else unembed[answer]
    final = frozen_norm(model.model.norm, cache[f"blocks.{n - 1}.hook_resid_post"][0, position])

    def logit_of(component: Tensor) -> Tensor:  # component [..., d] at the position -> its direct logit
        return final(component) @ direction

    embed = cache["hook_embed"][0, position]
    if "hook_pos_embed" in cache:
        embed = embed + cache["hook_pos_embed"][0, position]
    layers = torch.zeros(n, 2)
    max_heads = max(block.self_attn.n_heads for block in model.model.layers)
    heads = torch.full((n, max_heads), float("nan"))
    attn_bias = torch.zeros(n)
    for i, block in enumerate(model.model.layers):
        layers[i, 0] = logit_of(cache[f"blocks.{i}.hook_attn_out"][0, position])
        layers[i, 1] = logit_of(cache[f"blocks.{i}.hook_mlp_out"][0, position])
        attn = block.self_attn
        z = cache[f"blocks.{i}.attn.hook_z"][0, position].float()  # [H, D]
        w_o = attn.o_proj.weight.float().view(-1, attn.n_heads, attn.head_dim)  # [d, H, D]
        per_head = torch.einsum("hd,mhd->hm", z, w_o)  # [H, d]: each head's slice of o_proj
        bias = attn.o_proj.bias.float() if attn.o_proj.bias is not None else torch.zeros_like(per_head[0])
        if block.attn_out_norm is not None:  # Gemma 2: the post-attention norm, frozen like the final one
            post = frozen_norm(block.attn_out_norm, per_head.sum(0) + bias)
            per_head, bias = post(per_head), post(bias)
        heads[i, :attn.n_heads] = logit_of(per_head)
        attn_bias[i] = logit_of(bias)
    norm_bias = getattr(model.model.norm, "bias", None)
    constant = float(norm_bias.float() @ direction) if norm_bias is not None else 0.0
    actual = logits[0, position, answer] - (logits[0, position, wrong] if wrong is not None else 0.0)
    if model.config.final_logit_softcap is not None:  # attribute the pre-cap logit the components sum to
        hidden = model.model.norm(cache[f"blocks.{n - 1}.hook_resid_post"][0, position]).float()
        actual = hidden @ direction
    return LogitAttribution(answer, wrong, position, float(logit_of(embed)), layers, heads, attn_bias, constant,
                            float(actual))
