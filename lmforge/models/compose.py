"""Vision-language models composed from a trained text decoder and a fresh, seeded vision encoder: the starting
point for training Method A (LLaVA) and Method B (Llama 3.2 Vision cross-attention) on the same decoder.

    compose_llava:  image -> ViT (CLIP or SigLIP) -> 2-layer MLP projector -> one decoder input row per image
                    token, spliced in at the image placeholders (the decoder's vocabulary grows to hold the
                    placeholder id if it must)
    compose_mllama: image tiles -> tiled ViT -> linear projector -> states the decoder reads through gated
                    cross-attention layers inserted between its self-attention layers (the placeholder is one of
                    the 8 input-only ids past the LM head's vocabulary, as in Llama 3.2 Vision)

The decoder's weights are copied exactly and nothing else changes for text: on input without images (Mllama: also
with images, while the tanh gates are still at their initial zero) the composed model's logits are the decoder's.
Nothing is downloaded; ``save_composed`` writes a transformers-loadable directory with its
``preprocessor_config.json``. ``lmforge build-vlm`` does all of it from a decoder directory and its tokenizer.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.io import atomic_file
from lmforge.models.checkpoint import save_model
from lmforge.models.config import Config, _is_int
from lmforge.models.llava import LLAVA_TEXT_MODEL_TYPES, LlavaConfig, LlavaForConditionalGeneration, Projector
from lmforge.models.mllama import (EXTRA_INPUT_IDS, MllamaConfig, MllamaForConditionalGeneration, MllamaVisionConfig,
                                   TiledVisionEncoder, tile_arrangements)
from lmforge.models.model import CrossAttentionBlock, RMSNorm, Transformer
from lmforge.models.resize import resize_token_embeddings
from lmforge.models.vision import SUPPORTED_VISION_MODEL_TYPES, VisionBlock, VisionConfig, VisionTransformer

METHODS = ("llava", "mllama")
DEFAULT_IMAGE_TOKENS = {"llava": "<image>", "mllama": "<|image|>"}
# The image processors' normalisation: OpenAI CLIP's statistics (CLIP towers, and Llama 3.2 Vision's processor),
# 0.5 / 0.5 for SigLIP. (The same numbers as lmforge.data.image_processor, which this layer may not import.)
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
# Decoder config.json fields that describe the text-only checkpoint, not the composed model's text config.
_DROP_TEXT_EXTRA = ("architectures", "auto_map", "torch_dtype", "dtype", "transformers_version")


# ---- initialisation ------------------------------------------------------------------------------------------
def init_vision_weights(module: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> nn.Module:
    """Fresh weights for the new parts of a composed model (vision towers, projectors, cross-attention layers), in
    place, drawn in module order from ``generator`` (so a seed fixes them):

    * LayerNorm / RMSNorm: weight 1 (0 for a unit-offset RMSNorm), bias 0
    * biases: 0
    * tanh gates: 0, so a gated path starts closed (Mllama's cross-attention layers, and its aspect-ratio and tile
      position embeddings); the gates of the tiled ViT's global layers get normal(0, std) as in transformers'
      init, nearly closed but with gradient to their weights from the first step
    * everything else (linear, conv and embedding weights, class embedding, position tables): normal(0, std)
    """
    seen: set[int] = set()
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            with torch.no_grad():
                if isinstance(sub, (nn.LayerNorm, RMSNorm)):
                    unit_offset = isinstance(sub, RMSNorm) and sub.unit_offset
                    p.fill_(0.0 if name == "bias" or unit_offset else 1.0)
                elif name.endswith("bias"):
                    p.zero_()
                elif "gate" in name and not isinstance(sub, VisionBlock):
                    p.zero_()
                else:
                    p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=generator))
    return module


# ---- shared checks and helpers -------------------------------------------------------------------------------
def _check_decoder(decoder: Any, method: str) -> Config:
    if not isinstance(decoder, Transformer):
        kind = getattr(getattr(decoder, "config", None), "model_type", type(decoder).__name__)
        raise LmforgeError(f"{method} composition needs a text decoder (lmforge Transformer), got {kind}")
    from lmforge.models.quant import quantization_of

    if quantization_of(decoder) is not None:
        raise LmforgeError(f"{method} composition needs a float decoder; this one is quantized")
    config = decoder.config
    if config.cross_attention_layers or config.input_vocab_size is not None:
        raise LmforgeError(f"{method} composition needs a plain text decoder; this one already has cross-attention "
                           "layers or extra input ids (it is a vision-language model's decoder)")
    return config


def _text_extra(config: Config) -> dict[str, Any]:
    return {k: v for k, v in config.hf_extra.items() if k not in _DROP_TEXT_EXTRA}


def _copy_decoder(decoder: Transformer) -> Transformer:
    """A new ``Transformer`` with a copy of ``decoder``'s config and cloned weights (training the composed model
    leaves ``decoder`` as it was); tied embeddings stay one tensor."""
    config = copy.deepcopy(decoder.config)
    config.hf_extra = _text_extra(config)
    with torch.device("meta"):
        text = Transformer(config)
    text.load_state_dict({k: v.detach().clone() for k, v in decoder.state_dict().items()}, strict=True, assign=True)
    if config.tie_embeddings:
        text.lm_head.weight = text.model.embed_tokens.weight
    return text


def _fields_differing(a: Any, b: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(a) if f.name != "hf_extra" and getattr(a, f.name) != getattr(b, f.name)]


def _check_round_trip(config: LlavaConfig | MllamaConfig) -> None:
    """What ``save_composed`` writes must load back as ``config``: a decoder feature the composed checkpoint format
    cannot express (e.g. attention biases in a Mllama's Llama) is refused here, not silently dropped on save."""
    again = type(config).from_hf(json.loads(json.dumps(config.to_hf())))
    for part in ("text", "vision"):
        diff = _fields_differing(getattr(config, part), getattr(again, part))
        if diff:
            detail = ", ".join(f"{k}={getattr(getattr(config, part), k)!r} (would load as "
                               f"{getattr(getattr(again, part), k)!r})" for k in diff)
            raise LmforgeError(f"the composed {config.model_type} cannot be saved as a transformers checkpoint "
                               f"without changing its {part} config: {detail}")


def _finish(model: nn.Module, decoder: Transformer) -> nn.Module:
    """The new parts in the decoder's dtype and device, its generation config carried over, in eval mode (as
    ``load_model`` returns models)."""
    model.to(device=decoder.device, dtype=decoder.dtype)
    stray = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if stray:  # every tensor must have come from the decoder or the initialiser
        raise RuntimeError(f"composed model left uninitialised tensors: {stray[:5]}")
    generation_config = getattr(decoder, "generation_config", None)
    if isinstance(generation_config, dict) and generation_config:
        model.generation_config = dict(generation_config)
    return model.eval()


def _vision_config(family: str, image_size: int, patch_size: int, hidden: int, layers: int, heads: int,
                   intermediate: int | None) -> VisionConfig:
    if family not in SUPPORTED_VISION_MODEL_TYPES:
        raise LmforgeError(f"vision_family {family!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_VISION_MODEL_TYPES)}")
    d = dict(model_type=family, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
             num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size, patch_size=patch_size)
    if family == "siglip_vision_model":
        d["vision_use_head"] = False  # LLaVA reads hidden states; the pooling head would be unused weights
    return VisionConfig.from_hf(d)


# ---- Method A: LLaVA -----------------------------------------------------------------------------------------
def compose_llava(decoder: Transformer, *, image_token_id: int, image_size: int = 48, patch_size: int = 8,
                  vision_hidden: int = 128, vision_layers: int = 2, vision_heads: int = 4,
                  vision_intermediate: int | None = None, vision_family: str = "clip_vision_model",
                  feature_layer: int | list[int] = -1, select_strategy: str | None = None, std: float = 0.02,
                  seed: int = 0) -> LlavaForConditionalGeneration:
    """A LLaVA over a copy of ``decoder`` with a fresh (``seed``) CLIP or SigLIP vision tower and projector.

    ``image_token_id``: the placeholder each image feature replaces; it must be in the text vocabulary, which
    grows (``resize_token_embeddings``, mean-initialised rows) to ``image_token_id + 1`` when it is not.
    ``feature_layer``: the vision hidden state(s) the projector reads (-1: the last block's output).
    ``select_strategy``: "default" drops each image's first token (CLIP's class token), "full" keeps all; None
    picks "default" for CLIP and "full" for SigLIP (no class token). Gemma 2's final logit soft-cap is not applied
    by a LLaVA (transformers' head has none): it is kept in the config only."""
    text_config = _check_decoder(decoder, "LLaVA")
    if text_config.model_type not in LLAVA_TEXT_MODEL_TYPES:
        raise LmforgeError(f"a {text_config.model_type} decoder cannot be the text model of a LLaVA; supported: "
                           f"{', '.join(LLAVA_TEXT_MODEL_TYPES)}")
    if not _is_int(image_token_id) or image_token_id < 0:
        raise LmforgeError(f"image_token_id must be a non-negative token id, got {image_token_id!r}")
    vision = _vision_config(vision_family, image_size, patch_size, vision_hidden, vision_layers, vision_heads,
                            vision_intermediate)
    strategy = select_strategy or ("default" if vision.class_token else "full")

    text = _copy_decoder(decoder)
    if image_token_id >= text.config.vocab_size:
        resize_token_embeddings(text, image_token_id + 1)
    softcap = text.config.final_logit_softcap
    text.config = text.config.replace(final_logit_softcap=None)
    config = LlavaConfig(text=text.config, vision=vision, image_token_id=image_token_id,
                         projector_activation="gelu", projector_bias=True,
                         vision_feature_layer=list(feature_layer) if isinstance(feature_layer, (list, tuple))
                         else feature_layer,
                         vision_feature_select_strategy=strategy, text_final_logit_softcap=softcap)
    _check_round_trip(config)

    generator = torch.Generator().manual_seed(seed)
    tower = init_vision_weights(VisionTransformer(vision), std, generator)
    projector = init_vision_weights(Projector(config), std, generator)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.vision_tower, model.multi_modal_projector, model.language_model = tower, projector, text
    return _finish(model, decoder)


# ---- Method B: Llama 3.2 Vision (cross-attention) ------------------------------------------------------------
def cross_attention_positions(num_self_layers: int, every: int) -> list[int]:
    """Llama 3.2 Vision's schedule: a cross-attention layer before self-attention layers ``every - 1``,
    ``2 * every - 1``, ..., as indices into the combined layer list (``every=4`` over 32 layers gives the 11B
    model's [3, 8, 13, 18, 23, 28, 33, 38])."""
    if not _is_int(every) or every < 1:
        raise LmforgeError(f"cross_attention_every must be a positive integer, got {every!r}")
    positions: list[int] = []
    for layer in range(num_self_layers):
        if layer % every == every - 1:
            positions.append(layer + len(positions))
    if not positions:
        raise LmforgeError(f"cross_attention_every={every} puts no cross-attention layer in a {num_self_layers}-"
                           f"layer decoder; use at most {num_self_layers}")
    return positions


def _checked_positions(layers: Sequence[int], num_self_layers: int) -> list[int]:
    layers = list(layers)
    total = num_self_layers + len(layers)
    if (not layers or not all(_is_int(i) for i in layers) or len(set(layers)) != len(layers)
            or not all(0 <= i < total for i in layers)):
        raise LmforgeError(f"cross_attention_layers must be distinct indices into the combined list of "
                           f"{num_self_layers} self-attention layers plus {len(layers)} cross-attention layers "
                           f"(0..{total - 1}), got {layers!r}")
    return sorted(layers)


def compose_mllama(decoder: Transformer, *, image_token_id: int | None = None, cross_attention_every: int = 2,
                   cross_attention_layers: Sequence[int] | None = None, image_size: int = 48, patch_size: int = 8,
                   vision_hidden: int = 128, vision_layers: int = 2, vision_global_layers: int = 1,
                   vision_heads: int = 4, vision_intermediate: int | None = None,
                   intermediate_layers_indices: Sequence[int] | None = None, max_num_tiles: int = 1,
                   supported_aspect_ratios: Sequence[Sequence[int]] | None = None, std: float = 0.02,
                   seed: int = 0) -> MllamaForConditionalGeneration:
    """A Llama 3.2 Vision model over a copy of the Llama ``decoder``, with a fresh (``seed``) tiled ViT, projector
    and cross-attention layers.

    The text model is the decoder's self-attention layers with cross-attention layers inserted: before every
    ``cross_attention_every``-th one (``cross_attention_positions``), or at ``cross_attention_layers`` (indices
    into the combined list, as transformers' config holds them). Their tanh gates start at zero, so until they
    are trained the text logits are the decoder's, with or without images. The input embedding gets the 8
    input-only ids of Llama 3.2 Vision (``image_token_id``, default the first of them: the decoder's vocab_size),
    each row the mean of the decoder's rows (see the module note in ``resize``: the placeholder starts as an
    average token, a state the decoder's layers know; a zero row would be one they never saw, RMS-normalised to
    zero); the LM head is an untied copy of the decoder's (transformers' Mllama never ties).
    ``intermediate_layers_indices``: local ViT layers whose outputs join the final features (default: the last);
    ``supported_aspect_ratios`` must be ``tile_arrangements(max_num_tiles)`` (the default), the image processor's
    numbering."""
    src = _check_decoder(decoder, "Mllama")
    if src.model_type != "llama":
        raise LmforgeError(f"a {src.model_type} decoder cannot be the text model of a Mllama (Llama 3.2 Vision): "
                           "its text model is a Llama; use compose_llava for other decoder families")
    if any(getattr(src, k) is not None for k in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size",
                                                  "layer_types")):
        raise LmforgeError("a decoder with per-layer sizes or layer types cannot be a Mllama text model")
    vocab = src.vocab_size
    if image_token_id is None:
        image_token_id = vocab
    if not _is_int(image_token_id) or not vocab <= image_token_id < vocab + EXTRA_INPUT_IDS:
        raise LmforgeError(f"image_token_id {image_token_id!r} is not one of the Mllama text model's input-only ids "
                           f"{vocab}..{vocab + EXTRA_INPUT_IDS - 1} (the decoder's vocabulary is {vocab}; "
                           "Llama 3.2 Vision's <|image|> is the first id past it, which the LM head cannot emit)")
    n = src.num_layers
    positions = (_checked_positions(cross_attention_layers, n) if cross_attention_layers is not None
                 else cross_attention_positions(n, cross_attention_every))
    total = n + len(positions)
    text_config = src.replace(num_layers=total, cross_attention_layers=positions, tie_embeddings=False,
                              input_vocab_size=vocab + EXTRA_INPUT_IDS, hf_extra=_text_extra(src))
    arrangements = [list(a) for a in tile_arrangements(max_num_tiles)] if _is_int(max_num_tiles) and max_num_tiles > 0 else None
    ratios = [list(r) for r in supported_aspect_ratios] if supported_aspect_ratios is not None else arrangements
    if arrangements is not None and ratios != arrangements:
        raise LmforgeError(f"supported_aspect_ratios must be {arrangements} for max_num_tiles={max_num_tiles}: the "
                           f"image processor numbers the tile arrangements that way, got {ratios}")
    indices = list(intermediate_layers_indices) if intermediate_layers_indices is not None else [vision_layers - 1]
    vision = MllamaVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_intermediate or 4 * vision_hidden,
                                num_layers=vision_layers, num_heads=vision_heads, image_size=image_size,
                                patch_size=patch_size, num_global_layers=vision_global_layers,
                                max_num_tiles=max_num_tiles, supported_aspect_ratios=ratios,
                                intermediate_layers_indices=indices,
                                vision_output_dim=vision_hidden * (1 + len(indices)))
    config = MllamaConfig(text=text_config, vision=vision, image_token_id=image_token_id)
    _check_round_trip(config)

    generator = torch.Generator().manual_seed(seed)
    encoder = init_vision_weights(TiledVisionEncoder(vision), std, generator)
    projector = init_vision_weights(nn.Linear(vision.vision_output_dim, text_config.hidden_size), std, generator)
    # The text model's state: the decoder's tensors (self-attention layers renumbered), new cross-attention layers.
    ours = decoder.state_dict()
    state: dict[str, torch.Tensor] = {}
    self_positions = [i for i in range(total) if i not in positions]
    for old, new in enumerate(self_positions):
        prefix = f"model.layers.{old}."
        state.update({f"model.layers.{new}.{k[len(prefix):]}": v.detach().clone()
                      for k, v in ours.items() if k.startswith(prefix)})
    for layer in positions:
        block = init_vision_weights(CrossAttentionBlock(text_config, layer), std, generator)
        state.update({f"model.layers.{layer}.{k}": v.to(decoder.dtype) for k, v in block.state_dict().items()})
    embed = ours["model.embed_tokens.weight"].detach()
    mean = embed.float().mean(dim=0, keepdim=True).to(embed.dtype)  # as resize_token_embeddings grows a vocabulary
    state["model.embed_tokens.weight"] = torch.cat([embed, mean.expand(EXTRA_INPUT_IDS, -1)], dim=0)
    state["lm_head.weight"] = ours["lm_head.weight"].detach().clone()  # untied even when the decoder's is tied
    state["model.norm.weight"] = ours["model.norm.weight"].detach().clone()
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    model.language_model.load_state_dict(state, strict=True, assign=True)
    model.vision_model, model.multi_modal_projector = encoder, projector
    return _finish(model, decoder)


# ---- saving ------------------------------------------------------------------------------------------------
def image_processor_config(model: nn.Module) -> dict[str, Any]:
    """The ``preprocessor_config.json`` for a LLaVA or Mllama model: transformers' CLIP / SigLIP / Mllama image
    processor settings, sized to the model's vision encoder (``load_processor`` reads it)."""
    config = getattr(model, "config", None)
    common = dict(do_convert_rgb=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_resize=True)
    if isinstance(config, MllamaConfig):
        side = config.vision.image_size  # one tile
        return dict(image_processor_type="MllamaImageProcessor", **common, do_pad=True,
                    size={"height": side, "width": side}, resample=2, max_image_tiles=config.vision.max_num_tiles,
                    image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    if isinstance(config, LlavaConfig):
        side = config.vision.image_size
        if config.vision.model_type == "siglip_vision_model":
            return dict(image_processor_type="SiglipImageProcessor", **common, size={"height": side, "width": side},
                        resample=3, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
        return dict(image_processor_type="CLIPImageProcessor", **common, size={"shortest_edge": side}, resample=3,
                    do_center_crop=True, crop_size={"height": side, "width": side}, image_mean=OPENAI_CLIP_MEAN,
                    image_std=OPENAI_CLIP_STD)
    kind = getattr(config, "model_type", type(model).__name__)
    raise LmforgeError(f"{kind} is not a vision-language model (llava or mllama): it has no image processor")


def write_image_processor_config(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write ``image_processor_config(model)`` to ``out_dir/preprocessor_config.json``; returns that path."""
    path = Path(out_dir) / "preprocessor_config.json"
    with atomic_file(path) as f:
        json.dump(image_processor_config(model), f, indent=2)
    return path


class _DirectoryExtras:
    """What ``save_model`` writes into the new directory besides the weights (its ``tokenizer.save`` hook): the
    tokenizer's files and the preprocessor config, so the whole directory appears in one rename."""

    def __init__(self, model: nn.Module, tokenizer: Any | None) -> None:
        self.model, self.tokenizer = model, tokenizer

    def save(self, directory: Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save(directory)
        write_image_processor_config(self.model, directory)


def save_composed(model: LlavaForConditionalGeneration | MllamaForConditionalGeneration,
                  out_dir: str | os.PathLike, tokenizer: Any | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """``save_model`` plus ``preprocessor_config.json``: a directory ``load_model``, ``load_processor`` (given a
    tokenizer holding the image token) and transformers' ``from_pretrained`` load. ``tokenizer``: anything with
    ``save(directory)`` (an lmforge ``Tokenizer``)."""
    image_processor_config(model)  # not a vision-language model: fail before writing anything
    backend = getattr(tokenizer, "backend", None)
    image_token_id = model.config.image_token_id
    if backend is not None and backend.id_to_token(image_token_id) is None:
        raise LmforgeError(f"the tokenizer has no token with id {image_token_id}, the model's image placeholder; "
                           "add it to the tokenizer first")
    return save_model(model, out_dir, dtype=dtype, tokenizer=_DirectoryExtras(model, tokenizer))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters by part: vision encoder, projector, cross-attention layers (Mllama), decoder (the rest: the
    copied text model, grown embeddings included)."""
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    if isinstance(model, MllamaForConditionalGeneration):
        layers = model.language_model.model.layers
        cross = sum(count(layers[i]) for i in model.config.text.cross_attention_layers)
        return {"vision": count(model.vision_model), "projector": count(model.multi_modal_projector),
                "cross_attention": cross, "decoder": count(model.language_model) - cross}
    if isinstance(model, LlavaForConditionalGeneration):
        return {"vision": count(model.vision_tower), "projector": count(model.multi_modal_projector),
                "decoder": count(model.language_model)}
    raise LmforgeError(f"{type(model).__name__} is not a composed vision-language model")


# ---- the tokenizer's files, with the image placeholder added --------------------------------------------------
_TOKENIZER_SIDE_FILES = ("special_tokens_map.json", "chat_template.jinja")


class PlaceholderTokenizerFiles:
    """A tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``) with ``token`` made an added special
    token (one id whatever the text around it, skipped when decoding), as lmforge's ``Tokenizer`` and
    transformers' tokenizers load it. ``save(directory)`` writes ``tokenizer.json`` re-serialised, the source's
    ``tokenizer_config.json`` with the token appended to its extra special tokens, and its other side files
    unchanged. (The model layer edits the files itself: ``lmforge.data.tokenizer`` sits above it.)"""

    def __init__(self, source: str | os.PathLike, token: str) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        self.source = Path(source)
        file = self.source / "tokenizer.json"
        if not file.is_file():
            raise LmforgeError(f"{self.source} has no tokenizer.json (build-vlm needs the fast 'tokenizers' format; "
                               "pass --tokenizer DIR)")
        try:
            self.backend = RustTokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise LmforgeError(f"{file}: not a valid tokenizer file ({e})") from None
        config_file = self.source / "tokenizer_config.json"
        try:
            self.config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        except (OSError, ValueError) as e:
            raise LmforgeError(f"{config_file}: cannot read it ({e})") from None
        if not isinstance(self.config, dict):
            raise LmforgeError(f"{config_file} must hold a JSON object")
        self.token = token
        self.existed = self.backend.token_to_id(token) is not None
        special = any(t.content == token and t.special for t in self.backend.get_added_tokens_decoder().values())
        if not special:  # an existing plain token keeps its id and becomes special
            self.backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        self.token_id: int = self.backend.token_to_id(token)
        self._list_special(token)
        decoder = self.config.get("added_tokens_decoder")
        if isinstance(decoder, dict):  # transformers-saved configs repeat the added tokens, which it also reads
            decoder[str(self.token_id)] = dict(content=token, lstrip=False, normalized=False, rstrip=False,
                                               single_word=False, special=True)

    def _list_special(self, token: str) -> None:
        extra = self.config.get("extra_special_tokens")
        if extra is None and isinstance(self.config.get("additional_special_tokens"), list):
            extra = self.config["additional_special_tokens"]  # the older key, which lmforge also reads
        elif extra is None:
            extra = self.config["extra_special_tokens"] = []
        values = extra.values() if isinstance(extra, dict) else extra
        if token in [v.get("content") if isinstance(v, dict) else v for v in values]:
            return
        if isinstance(extra, dict):
            extra["image_token"] = token  # transformers' named extra special token (tokenizer.image_token)
        else:
            extra.append(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in _TOKENIZER_SIDE_FILES:
            if (self.source / name).is_file():
                shutil.copyfile(self.source / name, directory / name)
        with atomic_file(directory / "tokenizer.json") as f:
            f.write(self.backend.to_str(pretty=True))
        with atomic_file(directory / "tokenizer_config.json") as f:
            json.dump(self.config, f, indent=2, ensure_ascii=False)


# ---- lmforge build-vlm ---------------------------------------------------------------------------------------
def _build_vlm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decoder", required=True, help="a trained text decoder's directory (lmforge / HF, e.g. llama)")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="llava: image tokens spliced into the decoder's input (Method A); mllama: gated "
                        "cross-attention layers inserted into a Llama decoder (Method B)")
    p.add_argument("--out", required=True, help="the directory to write (replaced atomically if it exists)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --decoder)")
    p.add_argument("--image-token", default=None,
                   help="the image placeholder token, added as a special token if missing (default: <image> for "
                        "llava, <|image|> for mllama)")
    p.add_argument("--image-size", type=int, default=48, help="the vision encoder's image (mllama: tile) side")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=2, help="vision encoder layers (mllama: the local ones)")
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--vision-family", default="clip", choices=["clip", "siglip"], help="llava's vision tower")
    p.add_argument("--global-layers", type=int, default=1, help="mllama: the tiled ViT's gated global layers")
    p.add_argument("--max-tiles", type=int, default=1, help="mllama: tiles per image")
    p.add_argument("--cross-attention-every", type=int, default=2,
                   help="mllama: a cross-attention layer before every N-th self-attention layer")
    p.add_argument("--seed", type=int, default=0, help="seed of the new weights")


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def build_vlm(args: argparse.Namespace) -> int:
    from lmforge.models.checkpoint import load_model

    decoder_dir, out = Path(args.decoder), Path(args.out)
    if out.resolve() == decoder_dir.resolve():
        raise LmforgeError("--out must differ from --decoder (it would replace the decoder)")
    token = args.image_token or DEFAULT_IMAGE_TOKENS[args.method]
    tokenizer = PlaceholderTokenizerFiles(args.tokenizer or decoder_dir, token)
    decoder = load_model(decoder_dir, dtype=torch.float32, device="cpu")
    if not isinstance(decoder, Transformer):
        raise LmforgeError(f"{decoder_dir} is a {decoder.config.model_type} model, not a text decoder")
    vocab = decoder.config.vocab_size
    image_id = tokenizer.token_id
    sizes = dict(image_size=args.image_size, patch_size=args.patch_size, vision_hidden=args.vision_hidden,
                 vision_layers=args.vision_layers, vision_heads=args.vision_heads, seed=args.seed)
    if args.method == "llava":
        model = compose_llava(decoder, image_token_id=image_id, vision_family=f"{args.vision_family}_vision_model",
                              **sizes)
    else:
        if not vocab <= image_id < vocab + EXTRA_INPUT_IDS:
            raise LmforgeError(
                f"{token} has id {image_id} in the tokenizer, but a Mllama's image token must be one of the input-only "
                f"ids {vocab}..{vocab + EXTRA_INPUT_IDS - 1} past the decoder's vocabulary of {vocab} (the "
                f"tokenizer has {tokenizer.vocab_size} tokens{' with it' if not tokenizer.existed else ''}); use a "
                "tokenizer with exactly the decoder's vocabulary, or --method llava")
        model = compose_mllama(decoder, image_token_id=image_id, cross_attention_every=args.cross_attention_every,
                               vision_global_layers=args.global_layers, max_num_tiles=args.max_tiles, **sizes)
    save_composed(model, out, tokenizer=tokenizer)
    counts = parameter_counts(model)
    config = model.config
    if args.method == "llava":
        grown = f", vocabulary {vocab} -> {config.text.vocab_size}" if config.text.vocab_size != vocab else ""
        print(f"wrote {out}: llava ({config.vision.model_type}, {config.vision.image_size}px / {config.vision.patch_size}"
              f"), vision tower {_millions(counts['vision'])} + projector {_millions(counts['projector'])} + decoder "
              f"{_millions(counts['decoder'])} params; {config.num_image_tokens} image tokens per image in the "
              f"decoder's sequence; {token} = id {image_id}{grown}")
    else:
        tiles = config.vision.max_num_tiles
        print(f"wrote {out}: mllama ({config.vision.image_size}px tiles / {config.vision.patch_size}, up to {tiles}), "
              f"vision encoder {_millions(counts['vision'])} + projector {_millions(counts['projector'])} + "
              f"cross-attention layers {_millions(counts['cross_attention'])} (at {config.text.cross_attention_layers} "
              f"of {config.text.num_layers}) + decoder {_millions(counts['decoder'])} params; "
              f"{tiles * config.tokens_per_tile} cross-attended states per image ({tiles} tile(s) x "
              f"{config.tokens_per_tile}), one {token} token (id {image_id}) in the text")
    return 0


def _register() -> None:
    from lmforge.commands import command

    command("build-vlm", "compose a vision-language model (llava or mllama) from a trained text decoder and a "
                         "fresh vision encoder")(_build_vlm_args)(build_vlm)


_register()

__all__ = [
    "DEFAULT_IMAGE_TOKENS",
    "METHODS",
    "PlaceholderTokenizerFiles",
    "build_vlm",
    "compose_llava",
    "compose_mllama",
    "cross_attention_positions",
    "image_processor_config",
    "init_vision_weights",
    "parameter_counts",
    "save_composed",
    "write_image_processor_config",
]
