"""The decoder: every supported architecture is this one file driven by ``Config``.

Shapes: B batch, T new tokens, S cached + new tokens, H heads, K kv heads, D head dim.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.models.config import Config


# ---- building blocks -------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        # Gemma stores w and applies (1 + w): zeros init means identity there.
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor, hook_normalized: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``hook_normalized``: sees (and may replace) the normalised x before the weight, in float32."""
        # Normalise in float32 as the reference implementations do; bf16 variance is too coarse.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if hook_normalized is not None:
            xf = hook_normalized(xf)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.type_as(x)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor, hook_normalized: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``hook_normalized``: sees (and may replace) the normalised x before weight and bias."""
        if hook_normalized is None:
            return super().forward(x)
        normalized = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        replaced = hook_normalized(normalized)
        if replaced is normalized:  # read only: the fused kernel's result, bit for bit
            return super().forward(x)
        return replaced * self.weight + self.bias


def make_norm(config: Config, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm == "layernorm":
        return LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps, config.norm_unit_offset)


def activation(name: str, x: Tensor) -> Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    return F.relu(x)


def rope_inv_freq(config: Config, seq_len: int = 0) -> tuple[Tensor, float]:
    """Inverse frequencies for RoPE and the attention scaling factor applied to cos/sin."""
    dim, theta = config.rotary_dim, config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":  # Llama 3.1: stretch low frequencies, keep high ones, blend in between
        factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "longrope":  # Phi-3 long context: per-dimension factors, long ones past the original length
        old_len = int(scaling.get("original_max_position_embeddings") or config.max_position_embeddings)
        factors = scaling["long_factor"] if seq_len > old_len else scaling["short_factor"]
        ext = torch.tensor(factors, dtype=torch.float32)
        inv_freq = 1.0 / (ext * theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        factor = scaling.get("factor") or config.max_position_embeddings / old_len
        attn_factor = scaling.get("attention_factor")
        if attn_factor is None:
            attn_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
        return inv_freq, float(attn_factor)
    return inv_freq, 1.0


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """RoPE's rotate-half form, x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1], written as
    x * cos + [x2, x1] * [-sin, sin] (``signed_sin``, as ``Transformer._rope`` returns it): a roll and one fused
    multiply-add instead of a negation, a concatenation, two products and a sum. x: [B, H, T, D]; cos/signed_sin:
    [B, 1, T, rotary_dim]. Partial rotary leaves the tail untouched."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(rot // 2, dims=-1), signed_sin)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((torch.addcmul(x_rot * cos, x_rot.roll(rot // 2, dims=-1), signed_sin), x_pass), dim=-1)


# ---- the KV interface -------------------------------------------------------------------------------
class AttentionStep(Protocol):
    """What one forward pass asks of its KV store: where the new tokens are and how each layer attends.

    Three stores implement it: none (training and scoring: ``no_cache_step``), the static ``KVCache``
    (``generate``) and the engine's paged pool (``lmforge.engine.model_runner.PagedStep``). A store's
    ``begin(attention_mask)`` claims room for the call's tokens and returns the step (a ready step returns itself).
    """

    positions: Tensor  # [B, T] position of each new token (RoPE or learned embeddings)

    def begin(self, attention_mask: Tensor) -> "AttentionStep": ...

    def attend(self, attn: "Attention", q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        """Store this layer's new k/v [B, K, T, D] (after RoPE), then attention of q [B, H, T, D] over the
        stored context: [B, H, T, D]."""


def build_attention_mask(valid: Tensor, start: int, t: int, window: int | None) -> Tensor:
    """Boolean mask [B, 1, T, S] (True = may attend) over slots 0..S-1, S = start + t."""
    s = start + t
    q = torch.arange(start, s, device=valid.device)[:, None]
    k = torch.arange(s, device=valid.device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    mask = allowed[None] & valid[:, None, :s]
    # A padding query would attend to nothing (NaN in softmax); let it see itself, its output is unused.
    mask = mask | (q == k)[None]
    return mask[:, None]


class ContiguousStep:
    """New tokens at slots [start, start + t) of rows whose slot validity is ``valid`` [B, >= start + t];
    with ``cache`` their k/v are written there first and attention reads the cache, else it reads the call's own."""

    def __init__(self, positions: Tensor, valid: Tensor, start: int, t: int, padded: bool,
                 cache: "KVCache | None" = None) -> None:
        self.positions, self.valid, self.start, self.t = positions, valid, start, t
        self.padded, self.cache = padded, cache
        self._masks: dict[tuple[int | None, bool], Tensor | None] = {}

    def mask_for(self, window: int | None, layer: int = 0) -> Tensor | None:
        """None when plain causal attention is exact (lets SDPA take its fastest path)."""
        if window is not None and self.start + self.t <= window:
            window = None  # the window cannot bite yet
        pruned = self.cache is not None and self.cache.is_pruned(layer)
        key = (window, pruned)
        if key not in self._masks:
            if not self.padded and not pruned and window is None and (self.start == 0 or self.t == 1):
                self._masks[key] = None
            else:
                valid = self.cache.valid_for(layer) if pruned else self.valid
                self._masks[key] = build_attention_mask(valid, self.start, self.t, window)
        return self._masks[key]

    def context(self, attn: "Attention", k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store the new k/v (with a cache); return the keys, values and mask [B, 1, T, S] the queries attend
        over (mask None: causal over the call's own tokens, or everything when one token follows the cache)."""
        if self.cache is not None:
            end = self.start + self.t
            self.cache.keys[layer][:, :, self.start:end] = k
            self.cache.values[layer][:, :, self.start:end] = v
            k, v = self.cache.keys[layer][:, :, :end], self.cache.values[layer][:, :, :end]
        return k, v, self.mask_for(attn.window, layer)

    def attend(self, attn: "Attention", q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        k, v, mask = self.context(attn, k, v, layer)
        return attn.attention(q, k, v, mask, causal=mask is None and self.start == 0 and self.t > 1)

    def begin(self, attention_mask: Tensor) -> "ContiguousStep":
        return self


def no_cache_step(attention_mask: Tensor) -> ContiguousStep:
    """Training / scoring: the whole sequence in one call; positions count real tokens (left padding)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    return ContiguousStep(positions, attention_mask.bool(), 0, attention_mask.shape[1],
                          not bool(attention_mask.all()))


class SlotStep:
    """One new token per row written at the tensor slot ``slot`` [1]; attention reads the whole buffer under
    its validity mask. Every tensor has a fixed shape, so ``torch.compile`` traces it once per cache size."""

    def __init__(self, cache: "KVCache", slot: Tensor, positions: Tensor, windows: set[int | None]) -> None:
        self.cache, self.slot, self.positions = cache, slot, positions
        arange = torch.arange(cache.max_len, device=slot.device)
        groups = {False: cache.valid, **({True: cache.valid_pruned} if cache.valid_pruned is not None else {})}
        self.masks = {(w, pruned): (valid if w is None else valid & (arange > slot - w))[:, None, None, :]
                      for w in windows for pruned, valid in groups.items()}

    def context(self, attn: "Attention", k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """Write the new k/v at the slot; return the whole buffer and its validity mask [B, 1, 1, max_len]."""
        self.cache.keys[layer].index_copy_(2, self.slot, k)
        self.cache.values[layer].index_copy_(2, self.slot, v)
        return self.cache.keys[layer], self.cache.values[layer], self.masks[attn.window, self.cache.is_pruned(layer)]

    def attend(self, attn: "Attention", q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        return attn.attention(q, *self.context(attn, k, v, layer))

    def begin(self, attention_mask: Tensor) -> "SlotStep":
        return self


class KVCache:
    """Static, preallocated per-layer keys/values for incremental decoding (gpt-fast style).

    ``valid[b, s]`` says whether slot s of row b holds a real token (left padding does not), and
    ``next_position[b]`` is the RoPE position the next real token of row b gets.
    """

    def __init__(self, config: Config, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        self.max_len, self.length = max_len, 0
        # A cross-attention layer stores no text keys/values: its image ones live in ``cross_attention``.
        self.keys = [torch.zeros(batch_size, config.kv_heads(i), 0 if config.is_cross_attention(i) else max_len,
                                 config.head_dim, device=device, dtype=dtype)
                     for i in range(config.num_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.has_padding = False
        # What the cross-attention layers of later calls attend to (set by a vision model's prefill).
        self.cross_attention: CrossAttentionInputs | None = None
        # Token pruning (FastV, ``TokenPruning``): layers from ``pruned_from`` on never stored the dropped tokens,
        # so they read ``valid_pruned`` (``valid`` without those slots) instead of ``valid``.
        self.pruned_from: int | None = None
        self.valid_pruned: Tensor | None = None

    def is_pruned(self, layer: int) -> bool:
        return self.pruned_from is not None and layer >= self.pruned_from

    def repeat_rows(self, n: int) -> None:
        """Each row becomes ``n`` consecutive rows (in place): ``n`` continuations of one cached prefix, e.g. the
        G samples of a GRPO prompt scored after computing the prompt once."""
        if self.cross_attention is not None or self.pruned_from is not None:
            raise LmforgeError("repeat_rows: a cache with cross-attention inputs or pruned tokens is not repeated")
        self.keys = [k.repeat_interleave(n, 0) for k in self.keys]
        self.values = [v.repeat_interleave(n, 0) for v in self.values]
        self.valid = self.valid.repeat_interleave(n, 0)
        self.next_position = self.next_position.repeat_interleave(n, 0)

    def valid_for(self, layer: int) -> Tensor:
        """[B, max_len] which slots layer ``layer`` holds a real token in."""
        return self.valid_pruned if self.is_pruned(layer) else self.valid

    def reserve(self, attention_mask: Tensor) -> tuple[int, Tensor]:
        """Claim slots for T new tokens; return (start slot, their positions [B, T])."""
        start, t = self.length, attention_mask.shape[1]
        if start + t > self.max_len:
            raise ValueError(f"KV cache full: {start} cached + {t} new tokens > capacity {self.max_len}")
        mask = attention_mask.bool()
        self.valid[:, start:start + t] = mask
        if self.valid_pruned is not None:
            self.valid_pruned[:, start:start + t] = mask
        positions = self.next_position[:, None] + mask.long().cumsum(-1) - 1
        self.next_position += mask.long().sum(-1)
        self.has_padding = self.has_padding or not bool(mask.all())
        self.length = start + t
        return start, positions.clamp_(min=0)

    def begin(self, attention_mask: Tensor) -> ContiguousStep:
        start, positions = self.reserve(attention_mask)
        return ContiguousStep(positions, self.valid, start, attention_mask.shape[1], self.has_padding, cache=self)

    def begin_slot(self, batch_size: int, windows: set[int | None]) -> SlotStep:
        """A fixed-shape step for one token per row (see ``SlotStep``)."""
        start, positions = self.reserve(torch.ones(batch_size, 1, dtype=torch.long, device=self.valid.device))
        return SlotStep(self, torch.tensor([start], device=self.valid.device), positions, windows)

    def crop(self, length: int) -> None:
        """Forget everything after ``length`` slots (e.g. rejected speculative tokens)."""
        if length < self.length:
            dropped = self.valid[:, length:self.length].long().sum(-1)
            self.next_position -= dropped
            self.valid[:, length:self.length] = False
            if self.valid_pruned is not None:
                self.valid_pruned[:, length:self.length] = False
            self.length = length


def static_cache_of(cache: "KVCache | AttentionStep | None") -> KVCache | None:
    """The static ``KVCache`` behind ``cache`` (itself, or the cache a ``ContiguousStep``/``SlotStep`` writes to);
    None without one or for the paged engine's steps."""
    store = cache if isinstance(cache, KVCache) else getattr(cache, "cache", None)
    return store if isinstance(store, KVCache) else None


# ---- token pruning (FastV) ------------------------------------------------------------------------
@dataclass
class TokenPruning:
    """FastV (Chen et al. 2024, "An image is worth 1/2 tokens after layer 2"), training-free: blocks before
    ``layer`` see every token; in block ``layer - 1`` the attention the last token pays each other token (mean
    over heads, computed for that one query whatever attention path the layer takes) ranks the ``candidates``
    (image tokens), and blocks from ``layer`` on see only the non-candidates and the top ``keep`` share of each
    row's candidates (at least one; ties go to the earlier tokens — a sliding-window block that cannot see the
    images gives them all zero, so rank from a global-attention block there). Kept tokens keep their positions and
    KV slots; a dropped token's output is its hidden state after block ``layer - 1`` (nothing reads it: no label or
    next-token logit sits on an image token), and hooks from block ``layer`` on see the shorter sequence. Applies
    to a prefill from an empty cache (or without one); later tokens attend only to what was kept in those layers."""

    layer: int
    keep: float
    candidates: Tensor  # [B, T] bool
    scores: Tensor | None = None  # [B, T], set by block ``layer - 1``

    def check(self, config: Config, b: int, t: int) -> None:
        if not 1 <= self.layer < config.num_layers:
            raise LmforgeError(f"token pruning after layer {self.layer}: the layer must be in "
                               f"1..{config.num_layers - 1} (the ranking is read from the attention of the block "
                               "before it)")
        if not 0 < self.keep <= 1:
            raise LmforgeError(f"token pruning keeps a share in (0, 1] of the candidates, got {self.keep}")
        if tuple(self.candidates.shape) != (b, t):
            raise LmforgeError(f"token pruning candidates have shape {list(self.candidates.shape)}, the input "
                               f"[{b}, {t}]")

    def observe(self, attn: "Attention", q: Tensor, k: Tensor, valid: Tensor) -> None:
        """Rank from this block's attention: the last query row over the call's keys (``valid`` [B, T])."""
        if attn.n_kv != attn.n_heads:
            k = k.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)
        scores = (q[:, :, -1:] @ k.transpose(-2, -1)).squeeze(2).float() * attn.scale  # [B, H, T]
        if attn.softcap is not None:
            scores = torch.tanh(scores / attn.softcap) * attn.softcap
        t = k.shape[2]
        if attn.window is not None:
            valid = valid & (torch.arange(t, device=valid.device) > t - 1 - attn.window)
        self.scores = scores.masked_fill(~valid[:, None], float("-inf")).softmax(-1).mean(1)

    def compact(self, x: Tensor, cos: Tensor | None, sin: Tensor | None,
                step: "ContiguousStep") -> tuple[Tensor, Tensor | None, Tensor | None, "PrunedStep", Tensor]:
        """The kept tokens, left-padded to the longest row: (x, cos, sin, the step later blocks use, kept [B, T])."""
        if self.scores is None:
            raise LmforgeError(f"token pruning after layer {self.layer}: block {self.layer - 1} has no self-attention "
                               "to rank the candidates by")
        valid = step.valid[:, :x.shape[1]]
        candidates = self.candidates & valid
        count = candidates.sum(1)
        keep_n = torch.where(count > 0, (count * self.keep).round().clamp(min=1), count).long()
        order = self.scores.masked_fill(~candidates, float("-inf")).argsort(dim=1, descending=True, stable=True)
        positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        kept = ~candidates | (rank < keep_n[:, None])
        # Each row: its dropped tokens, then its kept ones, both in order; the last T' entries are the kept tokens
        # behind as many dropped ones as the row dropped beyond the row that dropped fewest (they pad, masked out).
        t_kept = int(kept.sum(1).max())
        arange = torch.arange(x.shape[1], device=x.device)
        index = (arange + x.shape[1] * kept).argsort(1)[:, -t_kept:]
        real = kept.gather(1, index)  # entries that are kept tokens (left padding included), not row padding
        x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        if cos is not None:
            gather = index[:, None, :, None].expand(-1, 1, -1, cos.shape[-1])
            cos, sin = cos.gather(2, gather), sin.gather(2, gather)
        return x, cos, sin, PrunedStep(step, self.layer, index, real, (kept & valid).gather(1, index)), kept


class PrunedStep:
    """The KV step of the blocks after a ``TokenPruning``: the kept tokens (``index`` [B, T'] into the call; ``real``
    False where an entry only pads a row, ``attended`` False there and on left padding) store k/v at their own
    slots; attention runs over the kept real tokens only."""

    def __init__(self, base: ContiguousStep, layer: int, index: Tensor, real: Tensor, attended: Tensor) -> None:
        if base.start != 0:
            raise LmforgeError("token pruning (FastV) runs on a prompt's prefill from an empty cache")
        self.base, self.index, self.real = base, index, real
        self.positions = base.positions.gather(1, index)
        q_slots = index  # start is 0: a token's slot is its index in the call
        cache = base.cache
        if cache is not None:
            end = base.t
            if cache.valid_pruned is None:
                cache.valid_pruned = cache.valid.clone()
            cache.pruned_from = layer
            cache.valid_pruned[:, :end] = False
            cache.valid_pruned[:, :end].scatter_(1, index, attended)
            key_slots, key_valid = torch.arange(end, device=index.device)[None], cache.valid_pruned[:, :end]
        else:
            key_slots, key_valid = index, attended
        self._allowed = (key_slots[:, None, :] <= q_slots[:, :, None]) & key_valid[:, None, :]
        self._distance = q_slots[:, :, None] - key_slots[:, None, :]
        self._masks: dict[int | None, Tensor] = {}

    def mask_for(self, window: int | None) -> Tensor:
        if window not in self._masks:
            allowed = self._allowed if window is None else self._allowed & (self._distance < window)
            self._masks[window] = (allowed | (self._distance == 0))[:, None]  # padding sees itself (no NaN)
        return self._masks[window]

    def context(self, attn: "Attention", k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        cache = self.base.cache
        if cache is not None:
            slots = self.index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            cache.keys[layer][:, :, :self.base.t].scatter_(2, slots, k)
            cache.values[layer][:, :, :self.base.t].scatter_(2, slots, v)
            k, v = cache.keys[layer][:, :, :self.base.t], cache.values[layer][:, :, :self.base.t]
        return k, v, self.mask_for(attn.window)

    def attend(self, attn: "Attention", q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        return attn.attention(q, *self.context(attn, k, v, layer))

    def begin(self, attention_mask: Tensor) -> "PrunedStep":
        return self


@dataclass
class CrossAttentionInputs:
    """What the cross-attention layers of one forward pass attend to: Llama 3.2 Vision's image tokens.

    ``states`` [B, N, hidden]: the image tokens, already projected to the decoder's width; each cross-attention
    layer makes its keys and values from them (and keeps them in ``cached`` when that is a dict, for later calls).
    None: the layers use the keys and values ``cached`` holds (decoding after a prefill). ``mask`` [B, 1, T or 1,
    N] bool, True where a text token may attend to an image token (None: everywhere). ``text_rows`` [B, T or 1,
    1]: 0 for a text token whose mask row was empty, 1 otherwise. As in transformers, such a row attends to every
    image token instead (an all-masked softmax is NaN) and its cross-attention MLP output is dropped; ``mask``
    already has those rows opened.
    """

    states: Tensor | None
    mask: Tensor | None = None
    text_rows: Tensor | None = None
    cached: dict[int, tuple[Tensor, Tensor]] | None = None

    def has_keys(self, layer: int) -> bool:
        return self.states is not None or (self.cached is not None and layer in self.cached)


# ---- hook points ---------------------------------------------------------------------------------
# Named activations a caller may read or replace, with TransformerLens's names and layouts:
# ``hooks={name: fn}`` where ``fn(activation, name)`` returns a replacement or None (keep).
# Model-wide: ``hook_embed`` (token embeddings, or ``inputs_embeds``), ``hook_pos_embed`` (learned positions
# only), ``ln_final.hook_normalized``. Per layer i: ``blocks.{i}.`` + a point below. The residual stream and
# sub-layer outputs are [B, T, hidden]; per-head tensors [B, T, heads, D]; scores/pattern [B, H, T, S].
# A norm's ``hook_normalized`` is its input normalised, before the norm's weight and bias (float32 for RMSNorm).
# ``Transformer.hook_names()`` lists one model's points in the order its forward pass reaches them.
BLOCK_HOOK_POINTS = ("hook_resid_pre", "ln1.hook_normalized", "hook_attn_out", "hook_resid_mid",
                     "ln2.hook_normalized", "hook_mlp_out", "hook_resid_post")
ATTENTION_HOOK_POINTS = tuple(f"attn.{p}" for p in (
    "hook_q", "hook_k", "hook_v",  # projections (k/v per kv head), before q/k norm and RoPE
    "hook_rot_q", "hook_rot_k",  # after RoPE (rotary models only)
    "hook_attn_scores", "hook_pattern",  # masked pre-softmax scores and probabilities [B, H, T, S]
    "hook_z",  # per-head outputs, before o_proj
))
MLP_HOOK_POINTS = ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")  # pre_linear: gated MLPs only
# MoE layers instead: the router's logits [B, T, experts] and the chosen experts' indices [B, T, top_k]. A
# replaced choice re-routes the tokens (weights: the router's probabilities of the new experts, renormalised).
MOE_HOOK_POINTS = ("mlp.hook_router_logits", "mlp.hook_expert_choice")
# Scores and pattern exist only when attention is computed step by step: hooking either switches that
# layer from SDPA to the explicit softmax, equal to it up to float rounding.
EXPLICIT_ATTENTION_POINTS = ("attn.hook_attn_scores", "attn.hook_pattern")
# A cross-attention block (Llama 3.2 Vision) has the block points above, with hook_attn_out and hook_mlp_out the
# gated contributions to the residual stream, and these: queries [B, T, H, D], the image keys/values [B, N, K, D]
# (only in a call that brings the images; later calls reuse them), per-head outputs [B, T, H, D].
CROSS_ATTENTION_HOOK_POINTS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")
Hook = Callable[[Tensor, str], "Tensor | None"]


class ForwardContext:
    """Per-call state every layer sees: the KV step (``kv.attend``), the hooks, MoE router logits, and what
    cross-attention layers attend to."""

    def __init__(self, kv: AttentionStep, hooks: Mapping[str, Hook | Sequence[Hook]] | None,
                 collect_router_logits: bool, cross_attention: CrossAttentionInputs | None = None,
                 pruning: TokenPruning | None = None) -> None:
        self.kv, self.hooks, self.pruning = kv, hooks or None, pruning
        self.router_logits: list[Tensor] | None = [] if collect_router_logits else None
        self.cross_attention = cross_attention

    def hook(self, name: str, x: Tensor) -> Tensor:
        """``x`` through the hooks registered at ``name`` (none: ``x`` itself, nothing else runs)."""
        if self.hooks is None or name not in self.hooks:
            return x
        fns = self.hooks[name]
        for fn in (fns if isinstance(fns, (list, tuple)) else (fns,)):
            out = fn(x, name)
            if out is not None:
                x = out
        return x

    def hook_heads(self, name: str, x: Tensor) -> Tensor:
        """``x`` [B, H, T, D] through the hooks at ``name``, which see it as [B, T, H, D]."""
        if self.hooks is None or name not in self.hooks:
            return x
        return self.hook(name, x.transpose(1, 2)).transpose(1, 2)

    def hooks_any(self, names: Sequence[str]) -> bool:
        return self.hooks is not None and any(name in self.hooks for name in names)

    def norm(self, norm: "RMSNorm | LayerNorm", name: str, x: Tensor) -> Tensor:
        """``norm(x)`` with its ``hook_normalized`` point ``name``: the normalised x before weight (and bias)."""
        if self.hooks is None or name not in self.hooks:
            return norm(x)
        return norm(x, lambda normalized: self.hook(name, normalized))


def _unhooked(name: str, x: Tensor) -> Tensor:
    return x


# ---- attention and MLP ---------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.heads(layer), config.kv_heads(layer), d
        self.window = config.window(layer)
        self.scale = config.attention_scale or d ** -0.5
        self.softcap = config.attn_logit_softcap
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=config.attention_out_bias)
        self.q_norm = RMSNorm(d, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.norm_eps) if config.qk_norm else None
        rotary = config.position_embedding == "rope"
        self.hook_names = {p: f"blocks.{layer}.{p}" for p in ATTENTION_HOOK_POINTS if rotary or "_rot_" not in p}
        self.explicit_hook_names = [self.hook_names[p] for p in EXPLICIT_ATTENTION_POINTS]

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, ctx: ForwardContext,
                layer: int) -> Tensor:
        names = self.hook_names
        b, t, _ = x.shape
        # Projected as [B, T, heads, D] (the hooks' layout), attended as [B, heads, T, D].
        q = ctx.hook(names["attn.hook_q"], self.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = ctx.hook(names["attn.hook_k"], self.k_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = ctx.hook(names["attn.hook_v"], self.v_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q = ctx.hook_heads(names["attn.hook_rot_q"], apply_rope(q, cos, sin))
            k = ctx.hook_heads(names["attn.hook_rot_k"], apply_rope(k, cos, sin))
        if ctx.pruning is not None and layer == ctx.pruning.layer - 1:
            ctx.pruning.observe(self, q, k, ctx.kv.valid[:, :t])
        if ctx.hooks_any(self.explicit_hook_names):
            y = self.explicit_attention(q, *self._stored_context(ctx, k, v, layer), ctx)
        else:
            y = ctx.kv.attend(self, q, k, v, layer)  # stores k/v where the KV store keeps them, then attends
        z = ctx.hook(names["attn.hook_z"], y.transpose(1, 2))  # [B, T, H, D]
        return self.o_proj(z.reshape(b, t, self.n_heads * self.head_dim))

    def _stored_context(self, ctx: ForwardContext, k: Tensor, v: Tensor,
                        layer: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """The keys, values and mask of the whole context, for the explicit path (the KV store still keeps k/v)."""
        if not isinstance(ctx.kv, (ContiguousStep, SlotStep, PrunedStep)):
            raise LmforgeError(
                f"{' / '.join(self.explicit_hook_names)} need the whole attention matrix, which a forward pass "
                f"computes without a KV store or with the static KVCache; {type(ctx.kv).__name__} (the paged "
                "engine) attends per sequence: hook these points on model(ids) instead")
        return ctx.kv.context(self, k, v, layer)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool = False) -> Tensor:
        """softmax(q k^T * scale [softcapped] + mask) v for q [B, H, T, D], k/v [B, K, S, D] (GQA when K < H).
        ``causal`` (mask None, T == S) lets SDPA take its fastest path."""
        if self.softcap is not None:
            return self.explicit_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                              enable_gqa=self.n_kv != self.n_heads)

    def explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                           ctx: ForwardContext | None = None) -> Tensor:
        """The same attention, step by step: for Gemma 2's soft-cap (scores = cap * tanh(scores / cap) before
        the mask; SDPA has no hook for it) and for ``ctx``'s hooks on the scores and pattern [B, H, T, S].
        ``mask`` None: causal over the call's own tokens (all of them when one token follows a cache)."""
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None:
            t, s = q.shape[2], k.shape[2]
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        hook = ctx.hook if ctx is not None else _unhooked
        scores = hook(self.hook_names["attn.hook_attn_scores"], scores)
        pattern = hook(self.hook_names["attn.hook_pattern"], torch.softmax(scores.float(), dim=-1).to(q.dtype))
        return pattern @ v


class MLP(nn.Module):
    def __init__(self, config: Config, ffn_size: int, hook_prefix: str) -> None:
        super().__init__()
        h = config.hidden_size
        self.act, self.gated = config.activation, config.mlp == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(h, ffn_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, ffn_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(ffn_size, h, bias=config.mlp_bias)
        points = [p for p in MLP_HOOK_POINTS if self.gated or p != "mlp.hook_pre_linear"]
        self.hook_names = {p: hook_prefix + p.removeprefix("mlp.") for p in points}

    def forward(self, x: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        """``ctx``: the hooks of a block's MLP (a MoE's experts see a subset of tokens and run unhooked)."""
        hook, names = (ctx.hook if ctx is not None else _unhooked), self.hook_names
        if self.gated:  # TransformerLens: pre = the gate's input to the activation, pre_linear = the up projection
            post = activation(self.act, hook(names["mlp.hook_pre"], self.gate_proj(x))) * hook(
                names["mlp.hook_pre_linear"], self.up_proj(x))
        else:
            post = activation(self.act, hook(names["mlp.hook_pre"], self.up_proj(x)))
        return self.down_proj(hook(names["mlp.hook_post"], post))


class MoE(nn.Module):
    """Sparse mixture of experts (Mixtral): route each token to its top-k experts, weights renormalised."""

    def __init__(self, config: Config, ffn_size: int, layer: int) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config, ffn_size, f"blocks.{layer}.mlp.experts.{e}.")
                                     for e in range(config.num_experts))
        self.hook_names = {p: f"blocks.{layer}.{p}" for p in MOE_HOOK_POINTS}

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        names, shape = self.hook_names, x.shape
        x = x.reshape(-1, shape[-1])  # [N, hidden], N = B*T tokens; hooks see them as [B, T, ...]
        router_logits = ctx.hook(names["mlp.hook_router_logits"], self.gate(x).unflatten(0, shape[:-1])).flatten(0, -2)
        if ctx.router_logits is not None:
            ctx.router_logits.append(router_logits)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        choice = chosen.unflatten(0, shape[:-1])
        hooked = ctx.hook(names["mlp.hook_expert_choice"], choice)
        if hooked is not choice:  # re-routed: the new experts weighted by their router probabilities
            chosen = hooked.flatten(0, -2).long()
            weights = probs.gather(-1, chosen)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(chosen == e)
            if token_idx.numel():
                out.index_add_(0, token_idx, expert(x[token_idx]) * weights[token_idx, slot, None])
        return out.view(shape)


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.get_submodule(name)`` is (module swaps: quantization, LoRA, packed weights)."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def load_balancing_loss(router_logits: list[Tensor], top_k: int, attention_mask: Tensor | None = None) -> Tensor:
    """Switch-Transformer auxiliary loss: E * sum_e (fraction of tokens routed to e) * (mean router prob of e).

    ``router_logits``: one [N, E] tensor per MoE layer (N = B*T tokens); padding tokens are excluded.
    Perfectly balanced routing gives ``top_k``; collapse onto k experts gives ``E``.
    """
    logits = torch.cat(router_logits, dim=0)
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    routed = F.one_hot(chosen, num_experts).float()  # [L*N, k, E]
    if attention_mask is None:
        tokens_per_expert = routed.mean(0)
        prob_per_expert = probs.mean(0)
    else:
        w = attention_mask.reshape(-1).float().repeat(len(router_logits))  # [L*N]
        tokens_per_expert = (routed * w[:, None, None]).sum(0) / w.sum()
        prob_per_expert = (probs * w[:, None]).sum(0) / w.sum()
    return num_experts * (tokens_per_expert * prob_per_expert[None]).sum()


class Block(nn.Module):
    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.attn_norm = make_norm(config)
        self.self_attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        ffn = config.ffn_size(layer)
        self.mlp = MoE(config, ffn, layer) if config.num_experts else MLP(config, ffn, f"blocks.{layer}.mlp.")
        # Gemma 2 "sandwich" norms on each sub-block's output.
        self.attn_out_norm = make_norm(config) if config.post_norms else None
        self.mlp_out_norm = make_norm(config) if config.post_norms else None
        self.hook_names = {p: f"blocks.{layer}.{p}" for p in BLOCK_HOOK_POINTS}

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, ctx: ForwardContext) -> Tensor:
        names = self.hook_names
        x = ctx.hook(names["hook_resid_pre"], x)
        h = self.self_attn(ctx.norm(self.attn_norm, names["ln1.hook_normalized"], x), cos, sin, ctx, self.layer)
        if self.attn_out_norm is not None:
            h = self.attn_out_norm(h)
        x = ctx.hook(names["hook_resid_mid"], x + ctx.hook(names["hook_attn_out"], h))
        h = self.mlp(ctx.norm(self.mlp_norm, names["ln2.hook_normalized"], x), ctx)
        if self.mlp_out_norm is not None:
            h = self.mlp_out_norm(h)
        return ctx.hook(names["hook_resid_post"], x + ctx.hook(names["hook_mlp_out"], h))

    def all_hook_names(self) -> list[str]:
        """This block's hook points, attention's and the MLP's included, in the order its forward reaches them."""
        own = self.hook_names
        return [own["hook_resid_pre"], own["ln1.hook_normalized"], *self.self_attn.hook_names.values(),
                own["hook_attn_out"], own["hook_resid_mid"], own["ln2.hook_normalized"],
                *self.mlp.hook_names.values(), own["hook_mlp_out"], own["hook_resid_post"]]


class CrossAttention(nn.Module):
    """Text queries over image keys/values (Llama 3.2 Vision): no RoPE, no causal mask, RMSNorm on each query
    and key head, no biases."""

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.heads(layer), config.kv_heads(layer), d
        self.scale = config.attention_scale or d ** -0.5
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, config.norm_eps)
        self.k_norm = RMSNorm(d, config.norm_eps)
        self.hook_names = {p: f"blocks.{layer}.{p}" for p in CROSS_ATTENTION_HOOK_POINTS}

    def keys_values(self, states: Tensor, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        """The image tokens [B, N, hidden] as keys (normed) and values [B, K, N, D]."""
        b, n, _ = states.shape
        k = ctx.hook(self.hook_names["attn.hook_k"], self.k_proj(states).view(b, n, self.n_kv, self.head_dim))
        v = ctx.hook(self.hook_names["attn.hook_v"], self.v_proj(states).view(b, n, self.n_kv, self.head_dim))
        return self.k_norm(k.transpose(1, 2)), v.transpose(1, 2)

    def forward(self, x: Tensor, cross: CrossAttentionInputs, ctx: ForwardContext, layer: int) -> Tensor:
        names = self.hook_names
        b, t, _ = x.shape
        q = ctx.hook(names["attn.hook_q"], self.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        q = self.q_norm(q)
        if cross.states is not None:
            k, v = self.keys_values(cross.states, ctx)
            if cross.cached is not None:  # computed once, at the prefill; decoding steps reuse them
                cross.cached[layer] = (k, v)
        else:
            k, v = cross.cached[layer]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=cross.mask, scale=self.scale,
                                           enable_gqa=self.n_kv != self.n_heads)
        z = ctx.hook(names["attn.hook_z"], y.transpose(1, 2))  # [B, T, H, D]
        return self.o_proj(z.reshape(b, t, self.n_heads * self.head_dim))


class CrossAttentionBlock(nn.Module):
    """Llama 3.2 Vision's cross-attention layer, in place of a self-attention block at the layers the config
    lists. Each sub-layer's output is scaled by tanh of a learned scalar gate, zero at initialisation, so a new
    layer starts as the identity:

        x = x + tanh(attn_gate) * cross_attn(norm(x), image tokens)
        x = x + tanh(mlp_gate) * text_rows * mlp(norm(x))

    A call without images (and none cached by an earlier call) skips the layer, as transformers does.
    """

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.attn_norm = make_norm(config)
        self.cross_attn = CrossAttention(config, layer)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config, config.ffn_size(layer), f"blocks.{layer}.mlp.")
        self.mlp_gate = nn.Parameter(torch.zeros(1))
        self.hook_names = {p: f"blocks.{layer}.{p}" for p in BLOCK_HOOK_POINTS}

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, ctx: ForwardContext) -> Tensor:
        cross = ctx.cross_attention
        if cross is None or not cross.has_keys(self.layer):
            return x
        names = self.hook_names
        x = ctx.hook(names["hook_resid_pre"], x)
        h = self.cross_attn(ctx.norm(self.attn_norm, names["ln1.hook_normalized"], x), cross, ctx, self.layer)
        x = ctx.hook(names["hook_resid_mid"], x + ctx.hook(names["hook_attn_out"], self.attn_gate.tanh() * h))
        h = self.mlp(ctx.norm(self.mlp_norm, names["ln2.hook_normalized"], x), ctx)
        if cross.text_rows is not None:
            h = cross.text_rows * h
        return ctx.hook(names["hook_resid_post"], x + ctx.hook(names["hook_mlp_out"], self.mlp_gate.tanh() * h))

    def all_hook_names(self) -> list[str]:
        own = self.hook_names
        return [own["hook_resid_pre"], own["ln1.hook_normalized"], *self.cross_attn.hook_names.values(),
                own["hook_attn_out"], own["hook_resid_mid"], own["ln2.hook_normalized"],
                *self.mlp.hook_names.values(), own["hook_mlp_out"], own["hook_resid_post"]]


# ---- the model -------------------------------------------------------------------------------------
class Backbone(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.embedding_rows, config.hidden_size)
        self.embed_positions = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                if config.position_embedding == "learned" else None)
        self.layers = nn.ModuleList(CrossAttentionBlock(config, i) if config.is_cross_attention(i) else Block(config, i)
                                    for i in range(config.num_layers))
        self.norm = make_norm(config)


class Transformer(nn.Module):
    """Decoder-only LM. ``model(input_ids, attention_mask)`` -> logits [B, T, vocab]."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.last_router_logits: list[Tensor] | None = None
        self._rope_cache: dict[tuple, tuple[Tensor, float]] = {}
        self.attention_windows = {config.window(i) for i in range(config.num_layers)}  # None: full attention
        self._hook_name_set = frozenset(self.hook_names())

    # -- helpers --
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "Transformer":
        """Fresh random weights (normal(0, std) linears/embeddings, unit norms), e.g. for pretraining."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = torch.empty(module.weight.shape).normal_(0.0, std, generator=gen)
                with torch.no_grad():
                    module.weight.copy_(w)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                with torch.no_grad():
                    if isinstance(module, RMSNorm) and module.unit_offset:
                        module.weight.zero_()
                    else:
                        module.weight.fill_(1.0)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
        return self

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        max_len = max_len or self.config.max_position_embeddings
        return KVCache(self.config, batch_size, max_len, self.device, self.dtype)

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, signed sin) [B, 1, T, rotary_dim] of ``positions`` [B, T], as ``apply_rope`` takes them."""
        scaling = self.config.rope_scaling or {}
        max_pos = 1
        if scaling.get("rope_type") == "longrope" and positions.numel():
            # Only longrope's frequencies depend on the length; reading it elsewhere would sync and break compile.
            max_pos = int(positions.max()) + 1
        key = (positions.device, max_pos > int(scaling.get("original_max_position_embeddings")
                                                or self.config.max_position_embeddings))
        if key not in self._rope_cache:
            inv_freq, attn_factor = rope_inv_freq(self.config, max_pos)
            self._rope_cache[key] = (inv_freq.to(positions.device), attn_factor)
        inv_freq, attn_factor = self._rope_cache[key]
        freqs = positions[:, :, None].float() * inv_freq[None, None, :]
        cos, sin = freqs.cos() * attn_factor, freqs.sin() * attn_factor
        # both halves of a head share the frequencies; the first half's sine is negated (see ``apply_rope``)
        return torch.cat((cos, cos), dim=-1)[:, None].to(dtype), torch.cat((-sin, sin), dim=-1)[:, None].to(dtype)

    def token_embeddings(self, input_ids: Tensor) -> Tensor:
        """The tokens' input embeddings [B, T, hidden], times the family's embedding multiplier (Gemma's
        sqrt(hidden)): what ``forward`` feeds the blocks for ``input_ids``, and what callers that splice other
        rows in (image features) start from before passing ``inputs_embeds``."""
        x = self.model.embed_tokens(input_ids)
        if self.config.embedding_multiplier != 1.0:
            # Gemma casts the multiplier to the activation dtype first; bf16 sqrt(2304) = 48.0, not 48.0000..
            x = x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype)
        return x

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: "KVCache | AttentionStep | None" = None, position_ids: Tensor | None = None,
                logits_to_keep: int | Tensor = 0, return_hidden: bool = False, inputs_embeds: Tensor | None = None,
                hooks: Mapping[str, Hook | Sequence[Hook]] | None = None,
                cross_attention: CrossAttentionInputs | None = None, prune: TokenPruning | None = None) -> Tensor:
        """Logits [B, T, vocab]: embed -> blocks -> final norm -> LM head (the only path, every caller).

        ``input_ids`` [B, T] or ``inputs_embeds`` [B, T, hidden] (e.g. image features spliced in; the
        embedding multiplier is the caller's to apply). ``attention_mask`` [B, T]: 1 for real tokens, 0 for
        padding (left padding for generation). ``cache``: the KV store (see ``KVCache.begin``); with one the
        tokens are appended and attend to everything stored before. ``logits_to_keep``: the last k positions
        (int), the positions given by a 1-D index tensor, or a [B, T] boolean mask (logits [N, vocab] for the
        N True positions, row-major: training computes the LM head only where a label is). ``return_hidden``:
        the final-normed hidden states instead of logits. ``hooks``: {name: fn or [fns]} at the points ``hook_names()`` lists (see
        ``BLOCK_HOOK_POINTS``); an unknown name is an ``LmforgeError``. ``cross_attention``: what the
        cross-attention layers attend to (Llama 3.2 Vision; None: what the static cache kept at the prefill, or
        nothing, when those layers are skipped). ``prune``: FastV token pruning of this prefill (``TokenPruning``).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if hooks:
            self.check_hook_names(hooks)
        b, t = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
        step = no_cache_step(attention_mask) if cache is None else cache.begin(attention_mask)
        positions = step.positions if position_ids is None else position_ids
        cfg = self.config
        if cross_attention is None and cfg.cross_attention_layers:
            cache_store = static_cache_of(step)
            cross_attention = cache_store.cross_attention if cache_store is not None else None
        if prune is not None:
            prune.check(cfg, b, t)
            if not isinstance(step, ContiguousStep) or step.start != 0:
                raise LmforgeError("token pruning (FastV) runs on a prompt's prefill from an empty static cache or "
                                   "without a cache, not on the paged engine or after cached tokens")
        ctx = ForwardContext(step, hooks, collect_router_logits=cfg.num_experts > 0, cross_attention=cross_attention,
                             pruning=prune)

        x = self.token_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        x = ctx.hook("hook_embed", x)
        cos = sin = None
        if self.model.embed_positions is not None:
            x = x + ctx.hook("hook_pos_embed", self.model.embed_positions(positions))
        else:
            cos, sin = self._rope(positions, x.dtype)

        before_pruning = kept = None
        for block in self.model.layers:
            if prune is not None and block.layer == prune.layer:
                before_pruning = x
                x, cos, sin, ctx.kv, kept = prune.compact(x, cos, sin, step)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, ctx, use_reentrant=False)
            else:
                x = block(x, cos, sin, ctx)
        self.last_router_logits = ctx.router_logits
        if kept is not None:  # back to [B, T]: the dropped tokens keep their state from before the pruning
            x = before_pruning.masked_scatter(kept[..., None], x[ctx.kv.real])
        if isinstance(logits_to_keep, Tensor):
            x = x[logits_to_keep] if logits_to_keep.dtype == torch.bool else x[:, logits_to_keep]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = ctx.norm(self.model.norm, "ln_final.hook_normalized", x)
        return x if return_hidden else self.unembed(x)

    def decode_step(self, tokens: Tensor, cache: KVCache, compiled: Callable | None = None) -> Tensor:
        """Append one token per row (``tokens`` [B]) to ``cache``; logits [B, vocab] for the next token.

        Same result as ``forward(tokens[:, None], cache=cache)[:, -1]``, through a ``SlotStep`` whose tensors
        have fixed shapes, so ``compiled`` (``torch.compile(model.forward)``) traces it once per cache size.
        """
        step = cache.begin_slot(tokens.shape[0], self.attention_windows)
        return (compiled or self.forward)(tokens[:, None], cache=step)[:, -1]

    def hook_names(self) -> list[str]:
        """Every hook point of this model, in the order the forward pass reaches them."""
        positions = ["hook_pos_embed"] if self.model.embed_positions is not None else []
        blocks = [name for block in self.model.layers for name in block.all_hook_names()]
        return ["hook_embed", *positions, *blocks, "ln_final.hook_normalized"]

    def check_hook_names(self, names: Iterable[str]) -> None:
        """An ``LmforgeError`` naming the unknown ones and listing the valid points, if any name is not one."""
        unknown = [name for name in names if name not in self._hook_name_set]
        if not unknown:
            return
        close = difflib.get_close_matches(unknown[0], self._hook_name_set, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        every_layer = [name.removeprefix("blocks.0.") for name in self.model.layers[0].all_hook_names()]
        model_wide = [name for name in self.hook_names() if not name.startswith("blocks.")]
        raise LmforgeError(
            f"unknown hook point(s) {', '.join(map(repr, unknown))}{hint}. This model's hook points: "
            f"{', '.join(model_wide)}, and blocks.{{i}}.<point> for i in 0..{self.config.num_layers - 1} with "
            f"<point> one of {', '.join(every_layer)}")

    def unembed(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden states -> logits (the LM head, then Gemma 2's soft-cap where configured)."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def aux_loss(self, attention_mask: Tensor | None = None) -> Tensor | None:
        """Router load-balancing loss of the last forward (MoE models), already scaled by its coefficient."""
        if not self.last_router_logits:
            return None
        loss = load_balancing_loss(self.last_router_logits, self.config.num_experts_per_tok, attention_mask)
        return self.config.router_aux_loss_coef * loss
