"""Llama 3.2 Vision (``model_type: mllama``): a tiled ViT whose features the decoder reads through gated
cross-attention layers (Method B), instead of image tokens spliced into the text (LLaVA, Method A).

    tiles    = an image cut into up to ``max_num_tiles`` square tiles (the processor picks the arrangement)
    features = tiled_vit(tiles, aspect ratio)         [B, images, tiles, tokens, hidden * (1 + intermediate)]
    states   = projector(features), flattened           [B, images * tiles * tokens, text hidden]
    logits   = decoder(input_ids, cross_attention=states, mask from cross_attention_mask)

The tiled ViT (``TiledVisionEncoder``): patch embedding per tile -> + gated aspect-ratio embedding ("pre-tile")
-> class token -> + gated position embedding (per patch, and per tile and aspect ratio) -> LayerNorm -> tokens
padded to a multiple of 8 -> local layers over all tiles of an image -> LayerNorm -> + gated aspect-ratio
embedding ("post-tile") -> gated global layers -> padding removed, concatenated with chosen local layers'
outputs. Its blocks are ``vision.py``'s, with no attention biases; its sizes are ``MllamaVisionConfig``.

The decoder is our one ``Transformer``: the layers in ``cross_attention_layers`` are ``CrossAttentionBlock``s
(model.py). Generation prefills with the images; the cross-attention keys/values are computed then, kept by
the static KV cache, and reused by every decoding step. Checkpoints are transformers'
``MllamaForConditionalGeneration`` directories.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.models.checkpoint import (TensorMap, _TensorSource, read_generation_config, read_mapped_state,
                                       read_model_config, weight_map)
from lmforge.models.config import Config, TextConfigView, _float, _int, _is_int, _rope_to_hf
from lmforge.models.device import pick_device
from lmforge.models.model import AttentionStep, CrossAttentionInputs, Hook, KVCache, Transformer, static_cache_of
from lmforge.models.quant import quantize_model
from lmforge.models.vision import (VisionBlock, VisionConfig, VisionLanguageModel, activation_from_hf,
                                   activation_to_hf, hub_layout_name, quantize_options)

# transformers' MllamaTextConfig / MllamaVisionConfig defaults (Llama 3.2 11B Vision), for fields a config.json
# leaves out.
_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128256, hidden_size=4096, hidden_act="silu", num_hidden_layers=40, num_attention_heads=32,
    num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0, rms_norm_eps=1e-5,
    max_position_embeddings=131072, tie_word_embeddings=False, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
    bos_token_id=128000, eos_token_id=128001, pad_token_id=128004)
_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1280, hidden_act="gelu", num_hidden_layers=32, num_global_layers=8, attention_heads=16,
    num_channels=3, intermediate_size=5120, vision_output_dim=7680, image_size=448, patch_size=14, norm_eps=1e-5,
    max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30])
_DEFAULT_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
EXTRA_INPUT_IDS = 8  # transformers' MllamaTextModel embeds vocab_size + 8 ids; <|image|> is one of them
# Fields we do not interpret but write back.
_KEEP_EXTRA = {"transformers_version", "torch_dtype", "dtype"}
_TEXT_KEEP_EXTRA = {"dropout", "initializer_range", "use_cache", "tie_word_embeddings"}
_VISION_KEEP_EXTRA = {"initializer_range"}
TOKEN_PADDING = 8  # the encoder pads each tile's tokens to a multiple of this (as Meta's code does)


def tile_arrangements(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, columns) of tiles using at most ``max_tiles``, in transformers' order: aspect-ratio id i + 1
    is arrangement i (0 marks a padding image); ``supported_aspect_ratios`` follows it."""
    return [(rows, cols) for rows in range(1, max_tiles + 1) for cols in range(1, max_tiles + 1)
            if rows * cols <= max_tiles]


def _int_list(value: Any, key: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        raise ConfigError(f"{key} must be a list of integers, got {value!r}")
    return list(value)


@dataclass
class MllamaVisionConfig(VisionConfig):
    """The tiled ViT: ``VisionConfig``'s encoder blocks (``num_layers`` local ones) plus tiles and global layers."""

    model_type: str = "mllama_vision_model"
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32  # local layers: attention over all tiles of an image
    num_heads: int = 16
    image_size: int = 448  # one tile's side
    patch_size: int = 14
    activation: str = "gelu"
    class_token: bool = True
    pre_norm: bool = True
    patch_bias: bool = False
    attention_bias: bool = False
    pooling: str = "none"
    num_global_layers: int = 8  # after the local ones, each sub-layer gated by tanh of a learned scalar
    max_num_tiles: int = 4
    supported_aspect_ratios: list[list[int]] = field(default_factory=lambda: [list(r) for r in _DEFAULT_ASPECT_RATIOS])
    intermediate_layers_indices: list[int] = field(default_factory=lambda: [3, 7, 15, 23, 30])
    vision_output_dim: int = 7680  # hidden_size * (1 + len(intermediate_layers_indices))

    supported_model_types = ("mllama_vision_model",)

    @property
    def max_aspect_ratio_id(self) -> int:
        """Aspect-ratio ids are 1-based indices into ``supported_aspect_ratios``; 0 is a padding image."""
        return len(self.supported_aspect_ratios)

    @property
    def padded_tokens(self) -> int:
        """Token slots per tile in the encoder: the class token and patches, padded to a multiple of 8."""
        return -(-self.seq_len // TOKEN_PADDING) * TOKEN_PADDING

    def validate(self) -> None:
        super().validate()

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid mllama vision config: {msg}")

        need(_is_int(self.num_global_layers) and self.num_global_layers >= 0,
             f"num_global_layers must be a non-negative integer, got {self.num_global_layers!r}")
        need(_is_int(self.max_num_tiles) and self.max_num_tiles > 0,
             f"max_num_tiles must be a positive integer, got {self.max_num_tiles!r}")
        ratios = self.supported_aspect_ratios
        need(isinstance(ratios, list) and len(ratios) > 0
             and all(isinstance(r, list) and len(r) == 2 and all(_is_int(v) and v > 0 for v in r) for r in ratios),
             f"supported_aspect_ratios must be a non-empty list of [width, height] tile counts, got {ratios!r}")
        too_many = [r for r in ratios if r[0] * r[1] > self.max_num_tiles]
        need(not too_many, f"supported_aspect_ratios {too_many} need more than max_num_tiles={self.max_num_tiles}")
        n = self.num_layers
        bad = [i for i in self.intermediate_layers_indices if not (_is_int(i) and -n <= i < n)]
        need(not bad, f"intermediate_layers_indices {bad} out of range for {n} local layers")
        width = self.hidden_size * (1 + len(self.intermediate_layers_indices))
        need(self.vision_output_dim == width,
             f"vision_output_dim={self.vision_output_dim}, but the encoder outputs hidden_size * (1 + "
             f"{len(self.intermediate_layers_indices)} intermediate layers) = {width}")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "MllamaVisionConfig":
        if not isinstance(d, dict):
            raise ConfigError("vision_config must be a JSON object")
        if d.get("model_type", "mllama_vision_model") != "mllama_vision_model":
            raise ConfigError(f"vision_config model_type {d.get('model_type')!r} is not supported in a mllama; "
                              "supported: mllama_vision_model")
        d = {**_VISION_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
        heads = d.get("num_attention_heads", d["attention_heads"])  # transformers' attribute_map spelling too
        ratios = d.get("supported_aspect_ratios") or _DEFAULT_ASPECT_RATIOS
        return cls(
            hidden_size=_int(d["hidden_size"], "hidden_size"), intermediate_size=_int(d["intermediate_size"],
                                                                                      "intermediate_size"),
            num_layers=_int(d["num_hidden_layers"], "num_hidden_layers"), num_heads=_int(heads, "attention_heads"),
            num_channels=_int(d["num_channels"], "num_channels"), image_size=_int(d["image_size"], "image_size"),
            patch_size=_int(d["patch_size"], "patch_size"),
            activation=activation_from_hf(d["hidden_act"], "vision_config hidden_act"),
            norm_eps=_float(d["norm_eps"], "norm_eps"),
            num_global_layers=_int(d["num_global_layers"], "num_global_layers", minimum=0),
            max_num_tiles=_int(d["max_num_tiles"], "max_num_tiles"),
            supported_aspect_ratios=[list(r) if isinstance(r, (list, tuple)) else r for r in ratios],
            intermediate_layers_indices=_int_list(d["intermediate_layers_indices"], "intermediate_layers_indices"),
            vision_output_dim=_int(d["vision_output_dim"], "vision_output_dim"),
            hf_extra={k: v for k, v in d.items() if k in _VISION_KEEP_EXTRA})

    def to_hf(self) -> dict[str, Any]:
        d = dict(self.hf_extra)
        d.update(model_type=self.model_type, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_layers, num_global_layers=self.num_global_layers,
                 attention_heads=self.num_heads, num_channels=self.num_channels, image_size=self.image_size,
                 patch_size=self.patch_size, hidden_act=activation_to_hf(self.activation), norm_eps=self.norm_eps,
                 max_num_tiles=self.max_num_tiles, supported_aspect_ratios=self.supported_aspect_ratios,
                 intermediate_layers_indices=self.intermediate_layers_indices,
                 vision_output_dim=self.vision_output_dim)
        return d


def _text_from_hf(d: Any) -> Config:
    """An ``mllama_text_model`` config as our decoder's: a Llama with cross-attention layers and 8 more input ids."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError("text_config must be a JSON object")
    if d.get("model_type", "mllama_text_model") != "mllama_text_model":
        raise ConfigError(f"text_config model_type {d.get('model_type')!r} is not supported in a mllama; "
                          "supported: mllama_text_model")
    # A null field takes transformers' default, except the special token ids: null there means "none", as transformers
    # keeps it (not Llama 3.2's ids, which would name tokens another vocabulary does not have).
    d = {**_TEXT_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k in _TOKEN_ID_FIELDS}}
    d.pop("head_dim", None)  # transformers' Mllama always uses hidden_size / num_attention_heads
    # Nor does it tie the LM head to the (larger) input embedding, whatever tie_word_embeddings says: the flag
    # is only written back.
    text = Config.from_hf({**d, "model_type": "llama", "tie_word_embeddings": False})
    return text.replace(cross_attention_layers=_int_list(d["cross_attention_layers"], "cross_attention_layers"),
                        input_vocab_size=text.vocab_size + EXTRA_INPUT_IDS,
                        hf_extra={k: v for k, v in d.items() if k in _TEXT_KEEP_EXTRA})


def _text_to_hf(text: Config) -> dict[str, Any]:
    d = dict(text.hf_extra)
    d.update(model_type="mllama_text_model", vocab_size=text.vocab_size, hidden_size=text.hidden_size,
             hidden_act=activation_to_hf(text.activation), num_hidden_layers=text.num_layers,
             num_attention_heads=text.num_heads, num_key_value_heads=text.num_kv_heads,
             intermediate_size=text.intermediate_size, rms_norm_eps=text.norm_eps,
             max_position_embeddings=text.max_position_embeddings,
             cross_attention_layers=list(text.cross_attention_layers))
    d.setdefault("tie_word_embeddings", False)
    d.update(_rope_to_hf(text))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        d[key] = getattr(text, key)
    return d


@dataclass
class MllamaConfig(TextConfigView):
    text: Config  # a Llama decoder with ``cross_attention_layers`` and ``input_vocab_size`` = vocab_size + 8
    vision: MllamaVisionConfig
    image_token_id: int = 128256  # <|image|>: an input id past the LM head's vocabulary
    hf_extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "mllama"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid mllama config: {msg}")

        need(bool(self.text.cross_attention_layers), "the text model has no cross_attention_layers")
        need(_is_int(self.image_token_id) and 0 <= self.image_token_id < self.text.embedding_rows,
             f"image_token_index {self.image_token_id!r} is outside the text model's {self.text.embedding_rows} "
             "input embeddings")

    def replace(self, **changes: Any) -> "MllamaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def tokens_per_tile(self) -> int:
        """Vision tokens per tile the decoder attends to: the class token and the patches."""
        return self.vision.seq_len

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "MllamaConfig":
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        if d.get("model_type") != "mllama":
            raise ConfigError(f"model_type {d.get('model_type')!r} is not mllama")
        try:
            text = _text_from_hf(d.get("text_config"))
        except ConfigError as e:
            raise ConfigError(f"text_config: {e}") from None
        try:
            vision = MllamaVisionConfig.from_hf(d.get("vision_config") or {})
        except ConfigError as e:
            raise ConfigError(f"vision_config: {e}") from None
        return cls(text=text, vision=vision, image_token_id=d.get("image_token_index", d.get("image_token_id", 128256)),
                   hf_extra={k: v for k, v in d.items() if k in _KEEP_EXTRA})

    def to_hf(self) -> dict[str, Any]:
        d = dict(self.hf_extra)
        d.update(model_type="mllama", architectures=["MllamaForConditionalGeneration"],
                 text_config=_text_to_hf(self.text), vision_config=self.vision.to_hf(),
                 image_token_index=self.image_token_id)
        return d


# ---- the tiled vision encoder ----------------------------------------------------------------------------------
class AspectRatioEmbedding(nn.Module):
    """A learned vector per (aspect ratio, tile), added to every token of the tile, scaled by tanh(gate)."""

    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        self.tiles, self.hidden = config.max_num_tiles, config.hidden_size
        self.embedding = nn.Embedding(config.max_aspect_ratio_id + 1, self.tiles * self.hidden)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """x [N, tiles, tokens, hidden]; aspect_ratio_ids [N]."""
        per_tile = self.embedding(aspect_ratio_ids).view(-1, self.tiles, 1, self.hidden)
        return x + per_tile * self.gate.tanh()


class TilePositionEmbedding(nn.Module):
    """Position embeddings blended by one gate: (1 - tanh g) * per-token + tanh g * per-(aspect ratio, tile, token)."""

    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        self.tiles, self.tokens, self.hidden = config.max_num_tiles, config.seq_len, config.hidden_size
        self.embedding = nn.Parameter(torch.zeros(self.tokens, self.hidden))
        self.tile_embedding = nn.Embedding(config.max_aspect_ratio_id + 1, self.tiles * self.tokens * self.hidden)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        gate = self.gate.tanh()
        x = x + ((1 - gate) * self.embedding).view(1, 1, self.tokens, self.hidden)
        per_tile = self.tile_embedding(aspect_ratio_ids).view(-1, self.tiles, self.tokens, self.hidden)
        return x + gate * per_tile


def tile_attention_mask(aspect_ratio_mask: Tensor, tokens: int, padded: int) -> Tensor:
    """Boolean [N, 1, S, S] (True = may attend) over the encoder's S = tiles * ``padded`` token slots of each image.

    A slot is padding when its tile is (``aspect_ratio_mask`` [N, tiles] 0) or it lies past the tile's
    ``tokens``. Only padding-to-padding pairs are masked: real tokens also attend to padding slots, as in Meta's
    code and transformers (the mask is the outer product of the padding indicators)."""
    slot_is_real = torch.arange(padded, device=aspect_ratio_mask.device) < tokens
    real = (aspect_ratio_mask.bool()[:, :, None] & slot_is_real).flatten(1)  # [N, S]
    return (real[:, :, None] | real[:, None, :])[:, None]


class TiledVisionEncoder(nn.Module):
    """``model(pixel_values [B, images, tiles, C, H, W], aspect_ratio_ids [B, images], aspect_ratio_mask
    [B, images, tiles])`` -> features [B, images, tiles, tokens, vision_output_dim]."""

    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.patch_embed = nn.Conv2d(config.num_channels, h, kernel_size=config.patch_size, stride=config.patch_size,
                                     bias=False)
        self.class_embed = nn.Parameter(torch.zeros(h))
        self.pre_tile_embed = AspectRatioEmbedding(config)
        self.position_embed = TilePositionEmbedding(config)
        self.post_tile_embed = AspectRatioEmbedding(config)
        # These two norms use LayerNorm's default epsilon whatever norm_eps says, as transformers' do.
        self.pre_norm = nn.LayerNorm(h)
        self.post_norm = nn.LayerNorm(h)
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_layers))
        self.global_layers = nn.ModuleList(VisionBlock(config, gated=True) for _ in range(config.num_global_layers))

    def check_inputs(self, pixel_values: Tensor, aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor) -> None:
        cfg = self.config
        want = (cfg.max_num_tiles, cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 6 or tuple(pixel_values.shape[2:]) != want:
            raise LmforgeError(f"pixel_values has shape {list(pixel_values.shape)}; this vision encoder takes [batch, "
                               f"images, {', '.join(map(str, want))}] (max_num_tiles {cfg.max_num_tiles} tiles of "
                               f"{cfg.image_size}x{cfg.image_size}; the model's image processor makes them)")
        images = tuple(pixel_values.shape[:2])
        if tuple(aspect_ratio_ids.shape) != images:
            raise LmforgeError(f"aspect_ratio_ids has shape {list(aspect_ratio_ids.shape)}; pixel_values needs "
                               f"[batch, images] = {list(images)}")
        if tuple(aspect_ratio_mask.shape) != (*images, cfg.max_num_tiles):
            raise LmforgeError(f"aspect_ratio_mask has shape {list(aspect_ratio_mask.shape)}; pixel_values needs "
                               f"[batch, images, tiles] = {[*images, cfg.max_num_tiles]}")
        if bool(((aspect_ratio_ids < 0) | (aspect_ratio_ids > cfg.max_aspect_ratio_id)).any()):
            raise LmforgeError(f"aspect_ratio_ids must be in 0..{cfg.max_aspect_ratio_id} (0: no image), got "
                               f"{sorted(set(aspect_ratio_ids.flatten().tolist()))}")

    def forward(self, pixel_values: Tensor, aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor) -> Tensor:
        cfg = self.config
        self.check_inputs(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        batch, images, tiles = pixel_values.shape[:3]
        tokens, padded = cfg.seq_len, cfg.padded_tokens
        ids = aspect_ratio_ids.reshape(-1)  # [N], N = batch * images
        x = self.patch_embed(pixel_values.flatten(0, 2).to(self.patch_embed.weight.dtype))  # [N*tiles, h, g, g]
        x = x.flatten(2).transpose(1, 2).unflatten(0, (-1, tiles))  # [N, tiles, patches, h]
        x = self.pre_tile_embed(x, ids)
        x = torch.cat([self.class_embed.expand(*x.shape[:2], 1, -1), x], dim=2)  # [N, tiles, tokens, h]
        x = self.pre_norm(self.position_embed(x, ids))
        x = F.pad(x, (0, 0, 0, padded - tokens)).flatten(1, 2)  # [N, tiles * padded, h]
        mask = tile_attention_mask(aspect_ratio_mask.reshape(-1, tiles), tokens, padded)

        local_outputs = []
        for block in self.layers:
            x = block(x, mask)
            local_outputs.append(x)
        x = self.post_tile_embed(self.post_norm(x).unflatten(1, (tiles, padded)), ids).flatten(1, 2)
        for block in self.global_layers:
            x = block(x, mask)

        def unpad(t: Tensor) -> Tensor:  # [N, tiles * padded, ...] -> [N, tiles, tokens, ...]
            return t.unflatten(1, (tiles, padded))[:, :, :tokens]

        # Stacked on a last axis then flattened: the intermediate features interleave (feature d of layer j
        # at d * layers + j), as transformers lays them out for the projector.
        intermediate = torch.stack([local_outputs[i] for i in cfg.intermediate_layers_indices], dim=-1)
        features = torch.cat([unpad(x), unpad(intermediate).flatten(-2)], dim=-1)
        return features.unflatten(0, (batch, images))


# ---- the model --------------------------------------------------------------------------------------------
class MllamaForConditionalGeneration(VisionLanguageModel):
    """``model(input_ids, attention_mask, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
    cross_attention_mask)`` -> logits [B, T, vocab], as transformers' class."""

    def __init__(self, config: MllamaConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = TiledVisionEncoder(config.vision)
        self.multi_modal_projector = nn.Linear(config.vision.vision_output_dim, config.text.hidden_size)
        self.language_model = Transformer(config.text)

    def image_states(self, pixel_values: Tensor, aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor) -> Tensor:
        """[B, images * tiles * tokens, text hidden]: what the cross-attention layers attend to."""
        device = self.device
        features = self.vision_model(pixel_values.to(device), aspect_ratio_ids.to(device),
                                     aspect_ratio_mask.to(device))
        return self.multi_modal_projector(features).flatten(1, 3)

    def prepare_cross_attention_mask(self, cross_attention_mask: Tensor, images: int) -> tuple[Tensor, Tensor]:
        """[B, T, images, tiles] (1: the token sees that tile) -> (mask [B, 1, T, N] bool, text rows [B, T, 1]),
        N = images * tiles * tokens: a tile's every token shares its entry. A row that sees nothing attends to
        every image token and its MLP output is dropped (``CrossAttentionInputs``), as in transformers."""
        tiles = self.config.vision.max_num_tiles
        if cross_attention_mask.dim() != 4 or tuple(cross_attention_mask.shape[2:]) != (images, tiles):
            raise LmforgeError(f"cross_attention_mask has shape {list(cross_attention_mask.shape)}; it needs [batch, "
                               f"tokens, images, tiles] with {images} image(s) and {tiles} tiles, as pixel_values")
        sees = cross_attention_mask.to(self.device) != 0
        sees = sees.repeat_interleave(self.config.tokens_per_tile, dim=3).flatten(2)  # [B, T, N]
        rows = sees.any(-1, keepdim=True)
        return (sees | ~rows)[:, None], rows.to(self.dtype)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, aspect_ratio_ids: Tensor | None = None,
                aspect_ratio_mask: Tensor | None = None, cross_attention_mask: Tensor | None = None,
                cache: "KVCache | AttentionStep | None" = None, position_ids: Tensor | None = None,
                logits_to_keep: int | Tensor = 0, return_hidden: bool = False, inputs_embeds: Tensor | None = None,
                hooks: dict[str, Hook] | None = None) -> Tensor:
        """Logits [B, T, vocab]. ``pixel_values`` [B, images, tiles, C, H, W] with ``aspect_ratio_ids`` [B, images]
        and ``aspect_ratio_mask`` [B, images, tiles] (``load_processor``'s output) are what the cross-attention
        layers attend to, ``cross_attention_mask`` [B, T, images, tiles] which text token sees which tile (None:
        all). With a static ``cache`` the image keys/values are kept there: a later call without pixel_values (a
        decoding step) attends to them, each new token through the last row of the mask (or its own
        ``cross_attention_mask`` rows). Without images and none cached the cross-attention layers are skipped.
        The other arguments are ``Transformer.forward``'s."""
        t = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
        store = static_cache_of(cache)
        if pixel_values is not None and cache is not None and store is None:
            raise LmforgeError("images with the paged engine are not supported yet for mllama; use generate()")
        if cross_attention_mask is not None and cross_attention_mask.shape[1] != t:
            # the whole conversation's mask with a cache, as transformers takes it: this call's rows
            past = store.length if store is not None else 0
            cross_attention_mask = cross_attention_mask[:, past:past + t]
        cross = self.cross_attention_inputs(pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask,
                                            store)
        logits = self.language_model(input_ids, attention_mask, cache=cache, position_ids=position_ids,
                                     logits_to_keep=logits_to_keep, return_hidden=return_hidden,
                                     inputs_embeds=inputs_embeds, hooks=hooks, cross_attention=cross)
        if store is not None and cross is not None:
            # Later tokens see the images as this call's last token does (transformers repeats its mask row).
            last_mask = cross.mask[:, :, -1:] if cross.mask is not None else None
            last_rows = cross.text_rows[:, -1:] if cross.text_rows is not None else None
            store.cross_attention = CrossAttentionInputs(None, last_mask, last_rows, cached=cross.cached)
        return logits

    def cross_attention_inputs(self, pixel_values: Tensor | None, aspect_ratio_ids: Tensor | None,
                               aspect_ratio_mask: Tensor | None, cross_attention_mask: Tensor | None,
                               store: KVCache | None) -> CrossAttentionInputs | None:
        """What this call's cross-attention layers attend to: the images' states (their keys/values to be kept in
        ``store``), or the keys/values ``store`` kept through new mask rows; None: the decoder decides (``store``'s
        last-row view, or no images at all)."""
        if pixel_values is not None:
            if aspect_ratio_ids is None or aspect_ratio_mask is None:
                raise LmforgeError("pixel_values need aspect_ratio_ids and aspect_ratio_mask (load_processor makes "
                                   "all three)")
            mask = text_rows = None
            if cross_attention_mask is not None:
                mask, text_rows = self.prepare_cross_attention_mask(cross_attention_mask, pixel_values.shape[1])
            return CrossAttentionInputs(self.image_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask), mask,
                                        text_rows, cached={} if store is not None else None)
        if cross_attention_mask is not None and store is not None and store.cross_attention is not None:
            cached = store.cross_attention.cached
            keys = next(iter(cached.values()))[0]  # [B, K, images * tiles * tokens, D]
            images = keys.shape[2] // (self.config.vision.max_num_tiles * self.config.tokens_per_tile)
            mask, text_rows = self.prepare_cross_attention_mask(cross_attention_mask, images)
            return CrossAttentionInputs(None, mask, text_rows, cached=cached)
        return None


# ---- checkpoints ------------------------------------------------------------------------------------------
# transformers' MllamaForConditionalGeneration names, one spelling per layout; the file's names are rewritten to
# the hub layout (the first, which transformers 5 still writes), which is also what we write.
_TOWER_HUB_RULES = ((re.compile(r"^model\.vision_model\."), "vision_model."),)


def hub_name(name: str) -> str:
    return hub_layout_name(name, _TOWER_HUB_RULES)


def _vision_weight_map(config: MllamaVisionConfig) -> list[TensorMap]:
    hf, us = "vision_model.", "vision_model."
    maps: list[TensorMap] = []

    def add(hf_name: str, ours: str) -> None:
        maps.append(TensorMap(hf + hf_name, (us + ours,)))

    add("patch_embedding.weight", "patch_embed.weight")
    add("class_embedding", "class_embed")
    for hf_name, ours in (("pre_tile_positional_embedding", "pre_tile_embed"),
                          ("post_tile_positional_embedding", "post_tile_embed")):
        add(f"{hf_name}.embedding.weight", f"{ours}.embedding.weight")
        add(f"{hf_name}.gate", f"{ours}.gate")
    add("gated_positional_embedding.embedding", "position_embed.embedding")
    add("gated_positional_embedding.tile_embedding.weight", "position_embed.tile_embedding.weight")
    add("gated_positional_embedding.gate", "position_embed.gate")
    for hf_name, ours in (("layernorm_pre", "pre_norm"), ("layernorm_post", "post_norm")):
        add(f"{hf_name}.weight", f"{ours}.weight")
        add(f"{hf_name}.bias", f"{ours}.bias")
    stacks = [("transformer", "layers", config.num_layers, False),
              ("global_transformer", "global_layers", config.num_global_layers, True)]
    for hf_stack, our_stack, n, gated in stacks:
        for i in range(n):
            h, o = f"{hf_stack}.layers.{i}", f"{our_stack}.{i}"
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                add(f"{h}.self_attn.{name}.weight", f"{o}.attn.{name}.weight")
            for hf_name, ours in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"),
                                  ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                add(f"{h}.{hf_name}.weight", f"{o}.{ours}.weight")
                add(f"{h}.{hf_name}.bias", f"{o}.{ours}.bias")
            if gated:
                add(f"{h}.gate_attn", f"{o}.attn_gate")
                add(f"{h}.gate_ffn", f"{o}.mlp_gate")
    return maps


def _cross_attention_layer_map(layer: int) -> list[TensorMap]:
    hf, us = f"language_model.model.layers.{layer}", f"language_model.model.layers.{layer}"
    pairs = [(f"cross_attn.{p}.weight", f"cross_attn.{p}.weight")
             for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
    pairs += [("cross_attn_attn_gate", "attn_gate"), ("cross_attn_mlp_gate", "mlp_gate"),
              ("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "mlp_norm.weight")]
    pairs += [(f"mlp.{p}.weight", f"mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
    return [TensorMap(f"{hf}.{a}", (f"{us}.{b}",)) for a, b in pairs]


def mllama_weight_map(config: MllamaConfig) -> list[TensorMap]:
    """Every tensor of a Mllama checkpoint (hub names) -> our parameters."""
    maps = _vision_weight_map(config.vision)
    for name in ("weight", "bias"):
        maps.append(TensorMap(f"multi_modal_projector.{name}", (f"multi_modal_projector.{name}",)))
    cross_layer = re.compile(r"model\.layers\.(\d+)\.")
    for tm in weight_map(config.text):  # the Llama map under the language model's prefix, but for cross layers
        layer = cross_layer.match(tm.hf)
        if layer is None or not config.text.is_cross_attention(int(layer.group(1))):
            maps.append(TensorMap("language_model." + tm.hf, tuple(f"language_model.{o}" for o in tm.ours)))
    for layer in config.text.cross_attention_layers:
        maps += _cross_attention_layer_map(layer)
    return maps


def read_mllama_config(path: str | os.PathLike) -> MllamaConfig:
    return read_model_config(path, MllamaConfig.from_hf)


def _check_cross_attention_layers(path: Path, config: MllamaConfig, names: set[str]) -> None:
    """The layers holding cross-attention weights against config.json's list, so a mismatch names both lists
    rather than the first missing tensor."""
    pattern = re.compile(r"^language_model\.model\.layers\.(\d+)\.cross_attn\.")
    found = sorted({int(m.group(1)) for n in names if (m := pattern.match(hub_name(n)))})
    if found != sorted(config.text.cross_attention_layers):
        raise CheckpointError(f"{path / 'config.json'}: text_config cross_attention_layers="
                              f"{config.text.cross_attention_layers}, but the weights hold cross-attention layers "
                              f"{found}; is config.json for this checkpoint?")


def load_mllama(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                quantize: object | None = None) -> MllamaForConditionalGeneration:
    """A transformers ``MllamaForConditionalGeneration`` directory (hub or in-memory key layout) as our model.
    ``quantize``: "int8" | "int4" | a ``QuantConfig``: the decoder's linears quantized, the cross-attention layers'
    with the rest (``lmforge.models.quant.quantize_model``); the vision encoder and the projector stay float (they run once per
    image)."""
    device = pick_device(device)
    quant = quantize_options(quantize, device)
    path = Path(path)
    config = read_mllama_config(path)
    generation_config = read_generation_config(path)
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    _check_cross_attention_layers(path, config, _TensorSource(path).names())
    text, vision = config.text, config.vision
    needed_for = (f"mllama with a {text.num_layers}-layer decoder (cross-attention layers "
                  f"{text.cross_attention_layers}) and a vision encoder of {vision.num_layers} local and "
                  f"{vision.num_global_layers} global layers")
    state = read_mapped_state(path, model.state_dict(), mllama_weight_map(config), dtype, device, kind="mllama",
                              needed_for=needed_for, canonical=hub_name)
    model.load_state_dict(state, strict=True, assign=True)
    if generation_config is not None:
        model.generation_config = generation_config
    return model.eval() if quant is None else quantize_model(model, quant)


__all__ = ["EXTRA_INPUT_IDS", "tile_arrangements", "MllamaConfig", "MllamaVisionConfig", "MllamaForConditionalGeneration", "TiledVisionEncoder",
           "load_mllama", "read_mllama_config", "mllama_weight_map", "tile_attention_mask"]
