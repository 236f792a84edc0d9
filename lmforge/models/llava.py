"""LLaVA (``model_type: llava``): a vision tower, a 2-layer MLP projector and any supported decoder.

    features = projector(concat_l hidden_states_l(vision_tower(pixels)) [drop the class token])
    embeds   = embed_tokens(input_ids) * embedding_multiplier, each image placeholder replaced by one feature row
    logits   = decoder(inputs_embeds=embeds)

The decoder is our one ``Transformer``: a LLaVA forward is the text model's forward on spliced embeddings, and
generation prefills those embeddings and then decodes through the text model's own KV cache (``generate``).
Checkpoints are transformers' ``LlavaForConditionalGeneration`` directories.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError, LmforgeError
from lmforge.models.checkpoint import (TensorMap, config_model_type, read_generation_config, read_mapped_state,
                                       read_model_config, weight_map)
from lmforge.models.config import Config, TextConfigView, _is_int
from lmforge.models.device import pick_device
from lmforge.models.model import AttentionStep, Hook, KVCache, TokenPruning, Transformer
from lmforge.models.quant import quantize_model
from lmforge.models.vision import (VisionConfig, VisionLanguageModel, VisionTransformer, activation_from_hf,
                                   activation_to_hf, fewest_tokens, hub_layout_name, merge_schedule, quantize_options,
                                   vision_activation, vision_weight_map)

# Decoder families whose HF base model keeps its tensors under "model." (a LLaVA stores them under its
# language model's prefix); GPT-2 and OpenELM checkpoints are laid out differently and have no LLaVA variants.
LLAVA_TEXT_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "phi3", "gemma2")
FEATURE_SELECT_STRATEGIES = ("default", "full")  # default: drop each image's first token (CLIP's class token)

# Older LLaVA config.json files (transformers 4.x ``to_diff_dict``) keep only the text-config fields that differ
# from LlamaConfig's defaults, e.g. llava-1.5: {"model_type": "llama", "vocab_size": 32064, ...}.
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                       tie_word_embeddings=False)
_KEEP_EXTRA = {"image_seq_length", "transformers_version", "torch_dtype", "dtype", "ignore_index", "pad_token_id"}


@dataclass
class LlavaConfig(TextConfigView):
    text: Config
    vision: VisionConfig
    image_token_id: int = 32000  # the placeholder token each image feature replaces
    projector_activation: str = "gelu"
    projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2  # index into the vision hidden states; a list is concatenated
    vision_feature_select_strategy: str = "default"
    # The text config's own final soft-cap (Gemma 2), written back on save: LLaVA's LM head applies none, so the
    # decoder here runs without it (``text.final_logit_softcap`` is None).
    text_final_logit_softcap: float | None = None
    hf_extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "llava"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def feature_layers(self) -> list[int]:
        layers = self.vision_feature_layer
        return [layers] if isinstance(layers, int) else list(layers)

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image: the vision tokens, less the first under the "default" strategy."""
        return self.vision.seq_len - (1 if self.vision_feature_select_strategy == "default" else 0)

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid llava config: {msg}")

        need(self.text.model_type in LLAVA_TEXT_MODEL_TYPES,
             f"text_config model_type {self.text.model_type!r} is not supported in a LLaVA; supported: "
             f"{', '.join(LLAVA_TEXT_MODEL_TYPES)}")
        need(_is_int(self.image_token_id) and 0 <= self.image_token_id < self.text.vocab_size,
             f"image_token_index {self.image_token_id!r} is outside the text vocabulary of {self.text.vocab_size}")
        layers = self.vision_feature_layer
        need((_is_int(layers) or (isinstance(layers, list) and layers and all(_is_int(i) for i in layers))),
             f"vision_feature_layer must be an integer or a non-empty list of them, got {layers!r}")
        n = self.vision.num_layers + 1  # the embeddings, then one per block
        bad = [i for i in self.feature_layers if not -n <= i < n]
        need(not bad, f"vision_feature_layer {bad} out of range: the vision tower has {n} hidden states "
                      f"(indices {-n}..{n - 1})")
        need(self.vision_feature_select_strategy in FEATURE_SELECT_STRATEGIES,
             f"vision_feature_select_strategy must be one of {', '.join(FEATURE_SELECT_STRATEGIES)}, got "
             f"{self.vision_feature_select_strategy!r}")
        need(self.text.final_logit_softcap is None, "the decoder of a LLaVA has no final soft-cap")

    def replace(self, **changes: Any) -> "LlavaConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "LlavaConfig":
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        if d.get("model_type") != "llava":
            raise ConfigError(f"model_type {d.get('model_type')!r} is not llava")
        text_d = d.get("text_config")
        if text_d is None:  # transformers' LlavaConfig default
            text_d = {"model_type": "llama"}
        if not isinstance(text_d, dict):
            raise ConfigError("text_config must be a JSON object")
        if text_d.get("model_type") not in LLAVA_TEXT_MODEL_TYPES:
            raise ConfigError(f"text_config model_type {text_d.get('model_type')!r} is not supported in a LLaVA; "
                              f"supported: {', '.join(LLAVA_TEXT_MODEL_TYPES)}")
        if text_d["model_type"] == "llama":
            text_d = {**_LLAMA_DEFAULTS, **text_d}
        try:
            text = Config.from_hf(text_d)
        except ConfigError as e:
            raise ConfigError(f"text_config: {e}") from None
        if "vision_config" not in d:
            raise ConfigError("config.json for llava has no vision_config")
        try:
            vision = VisionConfig.from_hf(d["vision_config"])
        except ConfigError as e:
            raise ConfigError(f"vision_config: {e}") from None
        if d.get("tie_word_embeddings"):
            text = text.replace(tie_embeddings=True)
        layers = d.get("vision_feature_layer", -2)
        return cls(
            text=text.replace(final_logit_softcap=None), vision=vision,
            image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
            projector_activation=activation_from_hf(d.get("projector_hidden_act", "gelu"), "projector_hidden_act"),
            projector_bias=bool(d.get("multimodal_projector_bias", True)),
            vision_feature_layer=list(layers) if isinstance(layers, tuple) else layers,
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            text_final_logit_softcap=text.final_logit_softcap,
            hf_extra={k: v for k, v in d.items() if k in _KEEP_EXTRA},
        )

    def to_hf(self) -> dict[str, Any]:
        text = self.text.to_hf()
        if "architectures" not in self.text.hf_extra:  # a LLaVA's text_config names no causal-LM class
            text.pop("architectures", None)
        if self.text.model_type == "gemma2":
            text["final_logit_softcapping"] = self.text_final_logit_softcap
        d = dict(self.hf_extra)
        d.update(model_type="llava", architectures=["LlavaForConditionalGeneration"], text_config=text,
                 vision_config=self.vision.to_hf(), image_token_index=self.image_token_id,
                 projector_hidden_act=activation_to_hf(self.projector_activation),
                 multimodal_projector_bias=self.projector_bias, vision_feature_layer=self.vision_feature_layer,
                 vision_feature_select_strategy=self.vision_feature_select_strategy,
                 tie_word_embeddings=self.text.tie_embeddings)
        d.setdefault("image_seq_length", self.num_image_tokens)
        return d


class Projector(nn.Module):
    """Vision features -> the decoder's width: linear, activation, linear."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        width = config.vision.hidden_size * len(config.feature_layers)
        h = config.text.hidden_size
        self.act = config.projector_activation
        self.linear_1 = nn.Linear(width, h, bias=config.projector_bias)
        self.linear_2 = nn.Linear(h, h, bias=config.projector_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(vision_activation(self.act, self.linear_1(x)))


class LlavaForConditionalGeneration(VisionLanguageModel):
    """``model(input_ids, attention_mask, pixel_values)`` -> logits [B, T, vocab], as transformers' class."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = VisionTransformer(config.vision)
        self.multi_modal_projector = Projector(config)
        self.language_model = Transformer(config.text)

    def vision_features(self, pixel_values: Tensor) -> Tensor:
        """[images, num_image_tokens, vision hidden * layers]: the selected vision hidden states (the projector's
        input)."""
        return self._selected(self.vision_tower(pixel_values.to(self.device)).hidden_states)

    def _selected(self, hidden: list[Tensor]) -> Tensor:
        chosen = [hidden[i] for i in self.config.feature_layers]
        if self.config.vision_feature_select_strategy == "default":
            chosen = [h[:, 1:] for h in chosen]
        return torch.cat(chosen, dim=-1)

    # HiRED-style visual token budget (training-free): the share of each image's tokens kept, chosen by the
    # attention the vision tower's class token gives them (``image_token_scores``); 1.0 keeps all.
    visual_token_fraction: float = 1.0
    # ToMe token merging (training-free) in the vision tower: the share of each image's tokens left at the feature
    # layer, similar tokens averaged rather than dropped (``token_merge_schedule``); 1.0 merges none. One of the two
    # budgets at a time.
    visual_token_merge: float = 1.0

    @property
    def tokens_per_image(self) -> int:
        """Image tokens each image takes in the decoder: ``config.num_image_tokens`` under the budget
        (``visual_token_fraction`` or ``visual_token_merge``). A processor must expand each placeholder to this many
        (``processor.tokens_per_image = model.tokens_per_image``)."""
        n = self.config.num_image_tokens
        f, merge = self.visual_token_fraction, self.visual_token_merge
        for name, value in (("visual_token_fraction", f), ("visual_token_merge", merge)):
            if not 0 < value <= 1:
                raise LmforgeError(f"{name} must be in (0, 1], got {value}")
        if f < 1 and merge < 1:
            raise LmforgeError(f"visual_token_fraction={f} and visual_token_merge={merge} are two budgets for the "
                               "same image tokens (keep the top-scoring ones, or merge similar ones): set one, leave "
                               "the other at 1.0")
        if merge < 1:
            self.token_merge_schedule()  # an unreachable budget is an error here, before any processor expands to it
        f = min(f, merge)
        return n if f >= 1 else max(1, round(n * f))

    def token_merge_schedule(self) -> list[int]:
        """Tokens ToMe merges in each vision block under ``visual_token_merge`` (``VisionTransformer.forward``'s
        ``merge``): exactly ``tokens_per_image`` image tokens at the feature layer, in the blocks before it only
        (``merge_schedule``). An ``LmforgeError`` for several feature layers (merging leaves them different token
        counts), or a budget those blocks cannot reach (it names the smallest reachable)."""
        config, f = self.config, self.visual_token_merge
        n = config.num_image_tokens
        if f >= 1:
            return [0] * config.vision.num_layers
        if len(config.feature_layers) > 1:
            raise LmforgeError(f"visual_token_merge needs one vision feature layer; this LLaVA concatenates "
                               f"{config.feature_layers}, which token merging leaves with different token counts")
        keep = max(1, round(n * f))
        layer = config.feature_layers[0]
        blocks = layer % (config.vision.num_layers + 1)  # hidden_states[i] is the output of the first i blocks
        protected = int(config.vision.class_token)  # the class token is never merged
        dropped = config.vision.seq_len - n  # the first token, which the "default" strategy drops
        fewest = fewest_tokens(config.vision.seq_len, protected, blocks) - dropped
        if keep < fewest:
            raise LmforgeError(
                f"visual_token_merge={f} asks for {keep} of {n} image tokens, but token merging (ToMe) merges at most "
                f"half of the mergeable tokens in each vision block, and feature layer {layer} reads the output of "
                f"{blocks} block(s): the fewest reachable is {fewest} of {n}, visual_token_merge >= {fewest / n:.4g}")
        return merge_schedule(config.vision.seq_len, protected, blocks, keep + dropped) + \
            [0] * (config.vision.num_layers - blocks)

    def image_token_scores(self, pixel_values: Tensor) -> Tensor:
        """[images, num_image_tokens]: each image token's importance, HiRED's rule: the attention the class token
        pays to its patch in the vision layer that reads the chosen features (the last layer for the last
        features). A tower without a class token (SigLIP) has no such view: the stated substitute is the mean
        attention each patch receives from all patches in that layer."""
        return self._token_scores(self.vision_tower(pixel_values.to(self.device)).hidden_states)

    def _token_scores(self, hidden: list[Tensor]) -> Tensor:
        tower = self.vision_tower
        n_layers = len(tower.layers)
        index = self.config.feature_layers[-1] % (n_layers + 1)
        index = min(index, n_layers - 1)  # hidden_states[i] is layers[i]'s input; the last output: the last layer
        block = tower.layers[index]
        has_class = tower.class_embed is not None
        scores = block.attn.attention_received(block.attn_norm(hidden[index]), from_first=has_class)
        if self.config.vision_feature_select_strategy == "default":
            scores = scores[:, 1:]  # the class token itself is not an image token
        return scores

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """[images, tokens_per_image, text hidden]: the selected vision hidden states, projected; under a
        ``visual_token_fraction`` below 1 only the highest-scoring tokens (``image_token_scores``), in their
        original order; under a ``visual_token_merge`` below 1 the tower's tokens merged (ToMe) down to that many,
        ordered by their first patch."""
        keep = self.tokens_per_image
        if keep == self.config.num_image_tokens:
            return self.multi_modal_projector(self.vision_features(pixel_values))
        if self.visual_token_merge < 1:
            merged = self.vision_tower(pixel_values.to(self.device), merge=self.token_merge_schedule())
            return self.multi_modal_projector(self._selected(merged.hidden_states))
        hidden = self.vision_tower(pixel_values.to(self.device)).hidden_states  # one pass for features and scores
        top = self._token_scores(hidden).topk(keep, dim=-1).indices.sort(dim=-1).values
        chosen = self._selected(hidden)
        return self.multi_modal_projector(chosen.gather(1, top[..., None].expand(-1, -1, chosen.shape[-1])))

    # FastV (training-free): after decoder block ``fastv_layer`` only the share ``fastv_keep`` of the image tokens
    # that the prompt's last token attends to most in the block before go on (``TokenPruning``); 1.0 keeps all.
    # It prunes a prefill (``forward``/``generate``/eval with images); the paged engine refuses it.
    fastv_layer: int = 2
    fastv_keep: float = 1.0

    def token_pruning(self, input_ids: Tensor) -> TokenPruning | None:
        """The FastV pruning of a prefill of ``input_ids`` (its image placeholders are the candidates), or None."""
        if self.fastv_keep >= 1:
            return None
        return TokenPruning(self.fastv_layer, self.fastv_keep, input_ids == self.config.image_token_id)

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """The decoder's input embeddings [B, T, hidden]: the tokens' (times the text family's embedding
        multiplier, Gemma's sqrt(hidden)), with the image placeholders replaced by the images' features in order,
        row by row. The features are not multiplied: transformers scales inside the embedding module
        (``Gemma2TextScaledWordEmbedding``), before the splice."""
        text = self.language_model
        image_token = self.config.image_token_id
        placeholders = input_ids == image_token
        x = text.token_embeddings(input_ids)
        if pixel_values is None:
            if bool(placeholders.any()):
                raise LmforgeError(f"input_ids hold {int(placeholders.sum())} image placeholder tokens (id "
                                   f"{image_token}) but no pixel_values were given")
        else:
            features = self.image_features(pixel_values)
            images, per_image = features.shape[:2]
            found = int(placeholders.sum())
            if found != images * per_image:
                raise LmforgeError(
                    f"input_ids hold {found} image placeholder tokens (id {image_token}) for {images} image(s), "
                    f"which need {per_image} each ({images * per_image} in all); expand each image placeholder "
                    f"to {per_image} tokens (load_processor does)")
            x = x.masked_scatter(placeholders[..., None], features.to(x.dtype))
        return x

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, cache: "KVCache | AttentionStep | None" = None,
                position_ids: Tensor | None = None, logits_to_keep: int | Tensor = 0, return_hidden: bool = False,
                inputs_embeds: Tensor | None = None, hooks: dict[str, Hook] | None = None) -> Tensor:
        """Logits [B, T, vocab]. ``pixel_values`` [images, C, H, W] (``load_processor``'s output) fill the image
        placeholders of ``input_ids``; the other arguments are ``Transformer.forward``'s (``inputs_embeds`` go to
        the decoder as they are)."""
        prune = None
        if pixel_values is not None:
            if input_ids is None:
                raise LmforgeError("pixel_values need input_ids (their image placeholders say where the images go)")
            prune = self.token_pruning(input_ids)
            inputs_embeds, input_ids = self.embed(input_ids, pixel_values), None
        elif input_ids is not None:  # a text-only call: the decoder embeds the ids itself
            found = int((input_ids == self.config.image_token_id).sum())
            if found:
                raise LmforgeError(f"input_ids hold {found} image placeholder tokens (id "
                                   f"{self.config.image_token_id}) but no pixel_values were given")
        return self.language_model(input_ids, attention_mask, cache=cache, position_ids=position_ids,
                                   logits_to_keep=logits_to_keep, return_hidden=return_hidden,
                                   inputs_embeds=inputs_embeds, hooks=hooks, prune=prune)


# ``--visual-tokens METHOD:SHARE``: which switch of ``LlavaForConditionalGeneration`` each method sets.
VISUAL_TOKEN_METHODS = {"hired": "visual_token_fraction", "tome": "visual_token_merge", "fastv": "fastv_keep"}


def set_visual_tokens(model: nn.Module, spec: str, processor: Any = None) -> None:
    """Turn on one visual token reduction from a spec: ``hired:0.25`` (keep the quarter of each image's tokens the
    vision tower's class token attends to most), ``tome:0.5`` (merge similar tokens in the vision tower down to half),
    ``fastv:0.5`` (after decoder block 2, keep half of the image tokens; ``fastv:0.5@3``: after block 3). The
    ``processor``, when given, is told how many tokens each image now takes."""
    method, _, rest = spec.partition(":")
    share, _, layer = rest.partition("@")
    if method not in VISUAL_TOKEN_METHODS or not share:
        raise LmforgeError(f"--visual-tokens {spec!r}: expected METHOD:SHARE with METHOD one of "
                           f"{', '.join(VISUAL_TOKEN_METHODS)} (e.g. hired:0.25, tome:0.5, fastv:0.5@2)")
    if not isinstance(model, LlavaForConditionalGeneration):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise LmforgeError(f"--visual-tokens needs a LLaVA-style model (image tokens in the decoder's sequence); "
                           f"this is {kind}")
    try:
        value = float(share)
        fastv_layer = int(layer) if layer else model.fastv_layer
    except ValueError:
        raise LmforgeError(f"--visual-tokens {spec!r}: the share must be a number in (0, 1] and the FastV layer an "
                           "integer") from None
    if layer and method != "fastv":
        raise LmforgeError(f"--visual-tokens {spec!r}: '@LAYER' is FastV's (the decoder block it prunes after)")
    if not 0 < value <= 1:
        raise LmforgeError(f"--visual-tokens {spec!r}: the share must be in (0, 1]")
    n_layers = model.config.text.num_layers
    if method == "fastv" and not 1 <= fastv_layer < n_layers:
        raise LmforgeError(f"--visual-tokens {spec!r}: FastV prunes after a decoder block in 1..{n_layers - 1}")
    setattr(model, VISUAL_TOKEN_METHODS[method], value)
    model.fastv_layer = fastv_layer
    tokens = model.tokens_per_image  # an impossible budget (ToMe) fails here
    if processor is not None:
        processor.tokens_per_image = tokens


def text_decoder(model: nn.Module, pixel_values: Tensor | None = None) -> Transformer:
    """The ``Transformer`` that decodes for ``model`` (a vision-language model's language model: LLaVA, Mllama);
    images for a text-only model are an ``LmforgeError``."""
    decoder = getattr(model, "language_model", None)
    if isinstance(decoder, Transformer):
        return decoder
    if pixel_values is not None:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise LmforgeError(f"this is a text-only model ({kind}): it takes no images; images need a vision-language "
                           "model (model_type llava or mllama)")
    return model


# ---- checkpoints -----------------------------------------------------------------------------------------
# transformers' LlavaForConditionalGeneration names, one spelling per layout it has used; the file's names are
# rewritten to the hub layout (the first), which is also what we write: every transformers version loads it.
_TOWER_HUB_RULES = (
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^vision_tower\.(?!vision_model\.)"), "vision_tower.vision_model."),  # transformers 5 in memory
)


def hub_name(name: str) -> str:
    return hub_layout_name(name, _TOWER_HUB_RULES)


def llava_weight_map(config: LlavaConfig) -> list[TensorMap]:
    """Every tensor of a LLaVA checkpoint (hub names) -> our parameters."""
    maps = vision_weight_map(config.vision, "vision_tower.vision_model.", "vision_tower.")
    for name in ("linear_1", "linear_2"):
        maps.append(TensorMap(f"multi_modal_projector.{name}.weight", (f"multi_modal_projector.{name}.weight",)))
        if config.projector_bias:
            maps.append(TensorMap(f"multi_modal_projector.{name}.bias", (f"multi_modal_projector.{name}.bias",)))
    for tm in weight_map(config.text):  # the decoder's own map, under the language model's prefix
        hf = "language_model." + tm.hf  # model.* -> language_model.model.*, lm_head.* -> language_model.lm_head.*
        maps.append(TensorMap(hf, tuple(f"language_model.{o}" for o in tm.ours), tm.transpose))
    return maps


def is_llava_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model directory whose config.json says ``model_type: llava`` (a malformed file is
    left to the loader to report)."""
    return config_model_type(path) == "llava"


def read_llava_config(path: str | os.PathLike) -> LlavaConfig:
    return read_model_config(path, LlavaConfig.from_hf)


def load_llava(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               quantize: object | None = None) -> LlavaForConditionalGeneration:
    """A transformers ``LlavaForConditionalGeneration`` directory (any of its key layouts) as our model.
    ``quantize``: "int8" | "int4" | a ``QuantConfig``: the decoder's linears quantized as a text model's are
    (``lmforge.models.quant.quantize_model``); the vision tower and the projector stay float (they run once per image)."""
    device = pick_device(device)
    quant = quantize_options(quantize, device)
    path = Path(path)
    config = read_llava_config(path)
    generation_config = read_generation_config(path)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    text = "language_model."
    tied = config.text.tie_embeddings
    needed_for = (f"llava with a {config.vision.model_type} tower of {config.vision.num_layers} layers and a "
                  f"{config.text.model_type} decoder of {config.text.num_layers}")
    state = read_mapped_state(path, model.state_dict(), llava_weight_map(config), dtype, device, kind="llava",
                              needed_for=needed_for, canonical=hub_name,
                              optional=[f"{text}lm_head.weight"] if tied else [])  # a tied file may still carry it
    if tied:
        state[f"{text}lm_head.weight"] = state[f"{text}model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.text.tie_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    if generation_config is not None:
        model.generation_config = generation_config
    return model.eval() if quant is None else quantize_model(model, quant)


__all__ = ["LlavaConfig", "LlavaForConditionalGeneration", "set_visual_tokens", "VISUAL_TOKEN_METHODS",
           "LLAVA_TEXT_MODEL_TYPES", "load_llava", "is_llava_directory", "read_llava_config", "llava_weight_map",
           "text_decoder", "hub_name"]
