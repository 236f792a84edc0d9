"""Vision encoders as data: one ViT driven by ``VisionConfig`` (CLIP and SigLIP vision towers).

pixels [N, C, H, W] -> patch embedding (a conv with stride = kernel = patch) -> [class token] + learned
positions -> [pre-norm] -> L pre-LN encoder blocks (LayerNorm, bidirectional MHA with biases, MLP) -> post-norm.

What differs between the families is data: CLIP has a class token, a pre-norm, a bias-free patch conv,
quick_gelu and pools by post-norming the class token; SigLIP has none of the first three, gelu-tanh,
post-norms every token and pools with an attention-pooling head ("MAP"). ``hidden_states`` (the embeddings
and every block's output) are returned for a multimodal model's feature selection.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError, LmforgeError
from lmforge.models.checkpoint import TensorMap
from lmforge.models.config import _float, _int, _is_int, _is_number
from lmforge.models.model import KVCache, Transformer
from lmforge.models.model import activation as decoder_activation

if TYPE_CHECKING:
    from lmforge.models.quant import QuantConfig

SUPPORTED_VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
# model_type of the vision-language models (config.json at the top of their directories)
VISION_LANGUAGE_MODEL_TYPES = ("llava", "mllama")
VISION_ACTIVATIONS = ("quick_gelu", "gelu_tanh", "gelu", "silu", "relu")
# transformers' ``hidden_act`` spellings -> ours
_ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu": "gelu", "silu": "silu", "swish": "silu", "relu": "relu"}
_ACT_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh"}

# Per family: the structural switches (the sizes come from config.json).
_ARCHITECTURE: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(class_token=True, pre_norm=True, patch_bias=False, pooling="cls",
                              defaults=dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, patch_size=32,
                                            image_size=224)),
    "siglip_vision_model": dict(class_token=False, pre_norm=False, patch_bias=True, pooling="map",
                                defaults=dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, patch_size=16,
                                              image_size=224)),
}
# Fields of a vision config.json we do not interpret but write back (e.g. CLIP's projection_dim).
_KEEP_EXTRA = {"projection_dim", "initializer_range", "initializer_factor", "attention_dropout", "dropout",
               "vocab_size", "torch_dtype", "dtype", "num_image_tokens"}


def activation_from_hf(name: Any, key: str) -> str:
    """A transformers ``hidden_act`` name as ours; ConfigError naming ``key`` and the supported names."""
    if not isinstance(name, str) or name not in _ACT_FROM_HF:
        raise ConfigError(f"{key} {name!r} is not supported; supported: {', '.join(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


def activation_to_hf(name: str) -> str:
    return _ACT_TO_HF.get(name, name)


def vision_activation(name: str, x: Tensor) -> Tensor:
    if name == "quick_gelu":  # CLIP's sigmoid approximation of GELU
        return x * torch.sigmoid(1.702 * x)
    return decoder_activation(name, x)


@dataclass
class VisionConfig:
    model_type: str = "clip_vision_model"  # the HF vision model_type: decides the checkpoint tensor names
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_channels: int = 3
    image_size: int = 224  # square inputs of this side
    patch_size: int = 32
    activation: str = "quick_gelu"
    norm_eps: float = 1e-5
    class_token: bool = True  # a learned token before the patches (CLIP)
    pre_norm: bool = True  # LayerNorm on the embeddings before the first block (CLIP's "pre_layrnorm")
    patch_bias: bool = False  # bias on the patch conv (SigLIP)
    attention_bias: bool = True  # biases on q/k/v/o (CLIP, SigLIP; Llama 3.2 Vision has none)
    # "cls": post-norm applied to the class token only (CLIP); "map": post-norm on every token, then the
    # attention-pooling head (SigLIP); "none": post-norm on every token, no pooled output (SigLIP, no head).
    pooling: str = "cls"
    hf_extra: dict[str, Any] = field(default_factory=dict, repr=False)

    supported_model_types: ClassVar[tuple[str, ...]] = SUPPORTED_VISION_MODEL_TYPES

    def __post_init__(self) -> None:
        self.validate()

    @property
    def grid(self) -> int:
        """Patches per side (a conv with stride = kernel drops a border narrower than a patch)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def seq_len(self) -> int:
        """Tokens per image in the encoder: the patches, plus the class token where there is one."""
        return self.num_patches + int(self.class_token)

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid vision config: {msg}")

        need(self.model_type in self.supported_model_types,
             f"vision model_type {self.model_type!r} is not supported; supported: "
             f"{', '.join(self.supported_model_types)}")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_channels", "image_size",
                     "patch_size"):
            value = getattr(self, name)
            need(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_heads}")
        need(self.patch_size <= self.image_size, f"patch_size={self.patch_size} exceeds image_size={self.image_size}")
        need(_is_number(self.norm_eps) and self.norm_eps > 0, f"layer_norm_eps must be positive, got {self.norm_eps!r}")
        need(self.activation in VISION_ACTIVATIONS, f"unsupported activation {self.activation!r}")
        need(self.pooling in ("cls", "map", "none"), f"pooling must be cls, map or none, got {self.pooling!r}")
        need(self.pooling != "cls" or self.class_token, "pooling 'cls' needs a class token")

    def replace(self, **changes: Any) -> "VisionConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "VisionConfig":
        if not isinstance(d, dict):
            raise ConfigError("vision_config must be a JSON object")
        model_type = d.get("model_type")
        if model_type not in _ARCHITECTURE:
            raise ConfigError(f"vision_config model_type {model_type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_VISION_MODEL_TYPES)}")
        arch = _ARCHITECTURE[model_type]
        d = {**arch["defaults"], **{k: v for k, v in d.items() if v is not None}}
        pooling = arch["pooling"]
        if model_type == "siglip_vision_model" and not d.get("vision_use_head", True):
            pooling = "none"
        return cls(
            model_type=model_type, hidden_size=_int(d.get("hidden_size", 768), "hidden_size"),
            intermediate_size=_int(d.get("intermediate_size", 3072), "intermediate_size"),
            num_layers=_int(d.get("num_hidden_layers", 12), "num_hidden_layers"),
            num_heads=_int(d.get("num_attention_heads", 12), "num_attention_heads"),
            num_channels=_int(d.get("num_channels", 3), "num_channels"),
            image_size=_int(d["image_size"], "image_size"), patch_size=_int(d["patch_size"], "patch_size"),
            activation=activation_from_hf(d["hidden_act"], "vision_config hidden_act"),
            norm_eps=_float(d["layer_norm_eps"], "layer_norm_eps"),
            class_token=arch["class_token"], pre_norm=arch["pre_norm"], patch_bias=arch["patch_bias"],
            pooling=pooling, hf_extra={k: v for k, v in d.items() if k in _KEEP_EXTRA},
        )

    def to_hf(self) -> dict[str, Any]:
        d = dict(self.hf_extra)
        d.update(model_type=self.model_type, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                 num_channels=self.num_channels, image_size=self.image_size, patch_size=self.patch_size,
                 hidden_act=activation_to_hf(self.activation), layer_norm_eps=self.norm_eps)
        if self.model_type == "siglip_vision_model":
            d["vision_use_head"] = self.pooling == "map"
        return d


# ---- the encoder ------------------------------------------------------------------------------------
class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention over an image's tokens (no mask: every token sees every token)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.n_heads, self.head_dim = config.num_heads, h // config.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=config.attention_bias)
                                                              for _ in range(4))

    def forward(self, x: Tensor, mask: Tensor | None = None, size: Tensor | None = None) -> Tensor:
        """``mask`` [N, 1, T, T] bool (True = may attend): the tiled encoder's padding (Llama 3.2 Vision).
        ``size`` [N, T]: under token merging, how many patches each token stands for (``attend``)."""
        return self.attend(x, mask, size)[0]

    def attend(self, x: Tensor, mask: Tensor | None = None, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(the output [N, T, hidden], the keys [N, heads, T, head_dim]: ToMe's similarity metric, for free).
        ``size``: ToMe's proportional attention, log(size) added to every query's logit for each key, so a token
        that averages s patches weighs as the s patches did (softmax of s equal logits)."""
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if size is not None:
            bias = size.log().to(q.dtype)[:, None, None, :]  # [N, 1, 1, T]: per key, every head and query
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale head_dim ** -0.5
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1)), k

    def attention_received(self, x: Tensor, from_first: bool) -> Tensor:
        """[N, T]: the attention each token receives in this layer for input ``x`` [N, T, hidden] (already
        normed), averaged over heads: from the first token only (a class token's view) or averaged over every
        query (a tower without one). The same scores ``forward``'s SDPA softmaxes, computed explicitly."""
        b, t, _ = x.shape
        q_in = x[:, :1] if from_first else x
        q = self.q_proj(q_in).view(b, q_in.shape[1], self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1)  # [N, heads, queries, T]
        return probs.mean(dim=(1, 2))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.act = config.activation
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(vision_activation(self.act, self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-LN: x + attn(norm(x)), then x + mlp(norm(x)). ``gated`` (Llama 3.2 Vision's global layers): each
    sub-layer's output is scaled by tanh of a learned scalar first."""

    def __init__(self, config: VisionConfig, gated: bool = False) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = VisionAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = VisionMLP(config)
        self.attn_gate = nn.Parameter(torch.zeros(1)) if gated else None
        self.mlp_gate = nn.Parameter(torch.zeros(1)) if gated else None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.mlp_step(self.attention_step(x, mask)[0])

    # The two residual halves apart: token merging (ToMe) happens between them.
    def attention_step(self, x: Tensor, mask: Tensor | None = None, size: Tensor | None = None
                       ) -> tuple[Tensor, Tensor]:
        """(x + attn(norm(x)), the attention's keys [N, heads, T, head_dim]); ``size`` as ``VisionAttention.attend``."""
        h, keys = self.attn.attend(self.attn_norm(x), mask, size)
        return x + (h if self.attn_gate is None else self.attn_gate.tanh() * h), keys

    def mlp_step(self, x: Tensor) -> Tensor:
        h = self.mlp(self.mlp_norm(x))
        return x + (h if self.mlp_gate is None else self.mlp_gate.tanh() * h)


# ---- token merging (ToMe: Bolya et al. 2023, "Token Merging: Your ViT but Faster") ------------------------------
@dataclass
class MergedTokens:
    x: Tensor  # [N, T, hidden]
    size: Tensor  # [N, T] float32: how many original tokens each token is the average of
    first: Tensor  # [N, T] long: each token's smallest original index; the tokens stay sorted by it


def fewest_tokens(tokens: int, protected: int, blocks: int) -> int:
    """The fewest tokens ToMe can leave after ``blocks`` merges of ``tokens``: each merge takes at most half of the
    mergeable ones (all but the ``protected`` first), as its bipartite matching pairs each of set A with set B."""
    mergeable = tokens - protected
    for _ in range(blocks):
        mergeable -= mergeable // 2
    return mergeable + protected


def merge_schedule(tokens: int, protected: int, blocks: int, target: int) -> list[int]:
    """Tokens to merge in each of ``blocks`` blocks (ToMe's r) so ``tokens`` become exactly ``target``: ToMe's
    constant schedule (the remainder in the first blocks), raised in a block only where the later blocks, at most
    halving each, could not reach the target otherwise. ``LmforgeError`` for a target out of reach."""
    lowest = fewest_tokens(tokens, protected, blocks)
    if not lowest <= target <= tokens:
        raise LmforgeError(f"token merging cannot turn {tokens} tokens into {target} in {blocks} block(s): "
                           f"reachable are {lowest}..{tokens}")
    mergeable, goal = tokens - protected, target - protected
    schedule = []
    for left in range(blocks, 0, -1):
        r = -(-(mergeable - goal) // left)  # an even share, rounded up
        while fewest_tokens(mergeable - r, 0, left - 1) > goal:
            r += 1  # stays <= mergeable // 2: the target is reachable from here
        schedule.append(r)
        mergeable -= r
    return schedule


def merge_tokens(x: Tensor, metric: Tensor, r: int, size: Tensor | None = None, first: Tensor | None = None,
                 protected: int = 0) -> MergedTokens:
    """ToMe's bipartite soft matching: ``r`` fewer tokens in ``x`` [N, T, hidden]. The ``protected`` first tokens
    (a class token) are kept as they are; the rest alternate into sets A and B, each A token's most similar B token
    (cosine of ``metric`` [N, T, dim], ToMe's keys averaged over heads) is its edge, and the ``r`` most similar
    edges merge their A token into the B token, weighted by ``size`` (None: ones). Every result token is the
    size-weighted mean of its group; the tokens are ordered by ``first`` (None: the positions), so merged tokens
    keep their patches' raster order."""
    n, t, d = x.shape
    if size is None:
        size = torch.ones(n, t, device=x.device)
    if first is None:
        first = torch.arange(t, device=x.device).expand(n, t)
    mergeable = t - protected
    if not 0 <= r <= mergeable // 2:
        raise LmforgeError(f"token merging takes 0..{mergeable // 2} of {mergeable} mergeable tokens in one step "
                           f"(half, at most), not {r}")
    if r == 0:
        return MergedTokens(x, size, first)
    keys = F.normalize(metric[:, protected:].float(), dim=-1)
    scores = keys[:, ::2] @ keys[:, 1::2].transpose(1, 2)  # [N, |A|, |B|] cosine similarities
    best, match = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)  # stable: ties go to the earlier A token
    src, stay = order[:, :r], order[:, r:]
    dst = match.gather(1, src)

    def halves(v: Tensor) -> tuple[Tensor, Tensor]:
        v = v[:, protected:]
        return v[:, ::2], v[:, 1::2]

    def rows(v: Tensor, index: Tensor) -> Tensor:
        return v.gather(1, index[..., None].expand(-1, -1, v.shape[-1]) if v.dim() == 3 else index)

    sums = x.float() * size[..., None]  # merge sums in float32: a mean over many bf16 patches stays exact-ish
    (sum_a, sum_b), (size_a, size_b), (first_a, first_b) = halves(sums), halves(size), halves(first)
    sum_b = sum_b.scatter_add(1, dst[..., None].expand(-1, -1, d), rows(sum_a, src))
    size_b = size_b.scatter_add(1, dst, rows(size_a, src))
    first_b = first_b.scatter_reduce(1, dst, rows(first_a, src), reduce="amin")
    group_sum = torch.cat([rows(sum_a, stay), sum_b], dim=1)
    group_size = torch.cat([rows(size_a, stay), size_b], dim=1)
    group_first = torch.cat([rows(first_a, stay), first_b], dim=1)
    place = group_first.argsort(dim=1)  # back to the order of each group's first original token
    group_size = group_size.gather(1, place)
    merged = (rows(group_sum, place) / group_size[..., None]).to(x.dtype)
    return MergedTokens(torch.cat([x[:, :protected], merged], dim=1),
                        torch.cat([size[:, :protected], group_size], dim=1),
                        torch.cat([first[:, :protected], group_first.gather(1, place)], dim=1))


class AttentionPooling(nn.Module):
    """SigLIP's "MAP" head: a learned probe attends over the tokens, then a residual MLP on its output."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_heads, batch_first=True)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: Tensor) -> Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1)
        y = self.attention(probe, x, x, need_weights=False)[0]
        return (y + self.mlp(self.norm(y)))[:, 0]


@dataclass
class VisionOutput:
    # L + 1 of [N, seq_len, hidden]: the embeddings (after the pre-norm), then each block's output
    hidden_states: list[Tensor]
    last_hidden_state: Tensor  # the last block's output (post-normed where pooling is not "cls")
    pooled: Tensor | None  # [N, hidden]: the post-normed class token ("cls") or the MAP head's output ("map")
    # Under token merging (``VisionTransformer.forward``'s ``merge``): the last block's output with its tokens' patch
    # counts and first patches; the hidden states shrink from the first merging block on.
    merged: MergedTokens | None = None


class VisionTransformer(nn.Module):
    """``model(pixel_values [N, C, image_size, image_size])`` -> ``VisionOutput``; ``merge=`` turns on token
    merging (ToMe)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.patch_embed = nn.Conv2d(config.num_channels, h, kernel_size=config.patch_size, stride=config.patch_size,
                                     bias=config.patch_bias)
        self.class_embed = nn.Parameter(torch.zeros(h)) if config.class_token else None
        self.position_embed = nn.Embedding(config.seq_len, h)
        self.pre_norm = nn.LayerNorm(h, eps=config.norm_eps) if config.pre_norm else None
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_layers))
        self.post_norm = nn.LayerNorm(h, eps=config.norm_eps)
        self.head = AttentionPooling(config) if config.pooling == "map" else None

    def forward(self, pixel_values: Tensor, merge: Sequence[int] | None = None) -> VisionOutput:
        """``merge``: ToMe, training-free: r tokens fewer after the attention of each block, in order (missing
        entries: 0); the class token is never merged and stays first. After the first merge, attention is
        proportional (``VisionAttention.attend``). None (or only zeros) computes exactly the plain forward."""
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise LmforgeError(f"pixel_values has shape {list(pixel_values.shape)}; this vision tower takes "
                               f"[images, {want[0]}, {want[1]}, {want[2]}] (image_size {cfg.image_size}; the "
                               "model's image processor resizes images to it)")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [N, hidden, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [N, patches, hidden], row-major over the grid
        if self.class_embed is not None:
            x = torch.cat([self.class_embed.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.position_embed.weight
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        hidden_states = [x]
        merged = None
        if merge is None:
            for block in self.layers:
                x = block(x)
                hidden_states.append(x)
        else:
            schedule = list(merge)
            if len(schedule) > len(self.layers) or not all(_is_int(r) and r >= 0 for r in schedule):
                raise LmforgeError(f"merge must be at most {len(self.layers)} non-negative integers (tokens merged "
                                   f"in each block), got {merge!r}")
            schedule += [0] * (len(self.layers) - len(schedule))
            protected = int(cfg.class_token)
            for block, r in zip(self.layers, schedule):
                # size stays None until the first merge: no proportional bias, the plain forward's numbers
                x, keys = block.attention_step(x, size=None if merged is None else merged.size)
                if r:
                    merged = merge_tokens(x, keys.mean(dim=1), r, None if merged is None else merged.size,
                                          None if merged is None else merged.first, protected)
                    x = merged.x
                x = block.mlp_step(x)
                hidden_states.append(x)
            if merged is not None:
                merged = dataclasses.replace(merged, x=x)
        if cfg.pooling == "cls":
            return VisionOutput(hidden_states, x, self.post_norm(x[:, 0]), merged)
        x = self.post_norm(x)
        return VisionOutput(hidden_states, x, self.head(x) if self.head is not None else None, merged)


def vision_weight_map(config: VisionConfig, hf_prefix: str, our_prefix: str) -> list[TensorMap]:
    """The vision tower's tensors: the HF CLIP/SigLIP vision model's names (under ``hf_prefix``) -> ours."""
    maps: list[TensorMap] = []

    def add(hf: str, ours: str) -> None:
        maps.append(TensorMap(hf_prefix + hf, (our_prefix + ours,)))

    def linear(hf: str, ours: str) -> None:  # every linear and LayerNorm here has a bias
        add(f"{hf}.weight", f"{ours}.weight")
        add(f"{hf}.bias", f"{ours}.bias")

    add("embeddings.patch_embedding.weight", "patch_embed.weight")
    if config.patch_bias:
        add("embeddings.patch_embedding.bias", "patch_embed.bias")
    if config.class_token:
        add("embeddings.class_embedding", "class_embed")
    add("embeddings.position_embedding.weight", "position_embed.weight")
    if config.pre_norm:
        linear("pre_layrnorm", "pre_norm")  # sic: CLIP's checkpoint name
    for i in range(config.num_layers):
        hf, us = f"encoder.layers.{i}", f"layers.{i}"
        linear(f"{hf}.layer_norm1", f"{us}.attn_norm")
        for name, ours in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj")):
            linear(f"{hf}.self_attn.{name}", f"{us}.attn.{ours}")
        linear(f"{hf}.layer_norm2", f"{us}.mlp_norm")
        linear(f"{hf}.mlp.fc1", f"{us}.mlp.fc1")
        linear(f"{hf}.mlp.fc2", f"{us}.mlp.fc2")
    linear("post_layernorm", "post_norm")
    if config.pooling == "map":
        add("head.probe", "head.probe")
        add("head.attention.in_proj_weight", "head.attention.in_proj_weight")
        add("head.attention.in_proj_bias", "head.attention.in_proj_bias")
        linear("head.attention.out_proj", "head.attention.out_proj")
        linear("head.layernorm", "head.norm")
        linear("head.mlp.fc1", "head.mlp.fc1")
        linear("head.mlp.fc2", "head.mlp.fc2")
    return maps


__all__ = ["SUPPORTED_VISION_MODEL_TYPES", "VISION_LANGUAGE_MODEL_TYPES", "MergedTokens", "VisionConfig",
           "VisionOutput", "VisionTransformer", "activation_from_hf", "activation_to_hf", "fewest_tokens",
           "merge_schedule", "merge_tokens", "vision_activation", "vision_weight_map"]


class VisionLanguageModel(nn.Module):
    """What the vision-language models (LLaVA, Mllama) share: ``language_model``, the ``Transformer`` that
    decodes, whose device, dtype and KV cache are the model's."""

    language_model: Transformer

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.language_model.new_cache(batch_size, max_len)

    def aux_loss(self, attention_mask: Tensor | None = None) -> Tensor | None:
        """The decoder's auxiliary loss of the last forward (MoE load balancing), as ``Transformer.aux_loss``."""
        return self.language_model.aux_loss(attention_mask)

    @property
    def quantization(self) -> QuantConfig | None:
        """The decoder's ``QuantConfig`` when ``quantize_model`` quantized it (what
        ``lmforge.models.quant.quantization_of`` reads), else None: read from the decoder, so it follows it (e.g.
        through ``dequantize_model(model.language_model)``)."""
        return getattr(self.language_model, "quantization", None)


# ---- weight-only quantization of the decoder ------------------------------------------------------------------
def quantize_options(quantize: Any, device: torch.device) -> QuantConfig | None:
    """``load_llava``/``load_mllama``'s ``quantize=`` checked before anything is read: None, or its ``QuantConfig``
    (one ``LmforgeError`` for an unknown format, or for a device the low-bit kernels do not run on)."""
    if quantize is None:
        return None
    from lmforge.models.quant import as_config

    config = as_config(quantize)
    if device.type != "cpu":
        raise LmforgeError(f"quantize ({config.describe()}): the low-bit kernels run on the CPU only, not on {device} "
                           "(load the model with device='cpu')")
    return config


# transformers' names for a vision-language model's decoder, head and projector in the layouts it has used, rewritten
# to the hub layout (which every transformers version loads, and which we write); each model adds its tower's rules.
_DECODER_HUB_RULES = (
    (re.compile(r"^model\.language_model\."), "language_model.model."),  # transformers >= 4.52 in memory
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
)


def hub_layout_name(name: str, tower_rules: tuple[tuple[re.Pattern, str], ...]) -> str:
    """``name`` in the hub layout: the shared decoder/projector rules, then the vision tower's, in order."""
    for pattern, replacement in (*_DECODER_HUB_RULES, *tower_rules):
        name = pattern.sub(replacement, name)
    return name
