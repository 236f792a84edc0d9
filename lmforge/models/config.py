"""One ``Config`` for every architecture: per-model differences are data, not subclasses.

``Config.from_hf`` reads a Hugging Face ``config.json`` dict (transformers v4 and v5 field
spellings); ``Config.to_hf`` writes one back that transformers loads unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "phi3", "gemma2", "gpt2", "openelm")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclass
class Config:
    model_type: str = "llama"  # the HF model_type: decides checkpoint tensor names
    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 1376
    max_position_embeddings: int = 2048

    # Layer-wise scaling (OpenELM): per-layer sizes; None means "same for every layer".
    layer_num_heads: list[int] | None = None
    layer_num_kv_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None

    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma: weight applied as (1 + w)
    post_norms: bool = False  # Gemma 2: norms after attention and MLP outputs too
    qk_norm: bool = False  # OpenELM: RMSNorm on each head's q and k

    mlp: str = "gated"  # "gated" (SwiGLU / GeGLU) | "plain" (GPT-2)
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu" | "relu"
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2, GPT-2)
    attention_out_bias: bool = False  # bias on the output projection (GPT-2)
    mlp_bias: bool = False

    position_embedding: str = "rope"  # "rope" | "learned" (GPT-2)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0

    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full" | "sliding"; None: all sliding if window set

    tie_embeddings: bool = False
    embedding_multiplier: float = 1.0  # Gemma: sqrt(hidden_size)
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    num_experts: int = 0  # 0: dense MLP
    num_experts_per_tok: int = 0
    router_aux_loss_coef: float = 0.0

    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    # Llama 3.2 Vision: these layers are cross-attention blocks (the text attends to image tokens) instead of
    # self-attention ones, and the input embedding holds more ids than the LM head predicts (its image token).
    cross_attention_layers: list[int] = field(default_factory=list)
    input_vocab_size: int | None = None  # rows of the input embedding; None: vocab_size

    # Fields of the source config.json we do not interpret, written back on save.
    hf_extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived, per layer -------------------------------------------------------------
    def heads(self, layer: int) -> int:
        return self.layer_num_heads[layer] if self.layer_num_heads else self.num_heads

    def kv_heads(self, layer: int) -> int:
        return self.layer_num_kv_heads[layer] if self.layer_num_kv_heads else self.num_kv_heads

    def ffn_size(self, layer: int) -> int:
        return self.layer_intermediate_size[layer] if self.layer_intermediate_size else self.intermediate_size

    def window(self, layer: int) -> int | None:
        """Sliding-window size for this layer, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def embedding_rows(self) -> int:
        """Token ids the input embedding holds (``input_vocab_size``, else ``vocab_size``)."""
        return self.input_vocab_size or self.vocab_size

    def is_cross_attention(self, layer: int) -> bool:
        return layer in self.cross_attention_layers

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid model config: {msg}")

        need(self.model_type in SUPPORTED_MODEL_TYPES,
             f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            need(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        for name in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size", "layer_types"):
            value = getattr(self, name)
            need(value is None or len(value) == self.num_layers,
                 f"{name} has {len(value) if value else 0} entries for {self.num_layers} layers")
        for name in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size"):
            need(all(_is_int(v) and v > 0 for v in getattr(self, name) or ()),
                 f"{name} entries must be positive integers, got {getattr(self, name)!r}")
        # A non-positive or non-finite epsilon/theta/scale loads fine and then gives NaN/inf logits.
        for name in ("norm_eps", "rope_theta", "embedding_multiplier", "partial_rotary_factor"):
            value = getattr(self, name)
            need(_is_number(value) and value > 0, f"{name} must be a positive finite number, got {value!r}")
        for name in ("attention_scale", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            need(value is None or (_is_number(value) and value > 0),
                 f"{name} must be a positive finite number or null, got {value!r}")
        need(_is_number(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0,
             f"router_aux_loss_coef must be a non-negative number, got {self.router_aux_loss_coef!r}")
        need(_is_int(self.num_experts) and self.num_experts >= 0,
             f"num_experts must be a non-negative integer, got {self.num_experts!r}")
        for i in range(self.num_layers):
            need(self.heads(i) % self.kv_heads(i) == 0,
                 f"layer {i}: {self.heads(i)} query heads not divisible by {self.kv_heads(i)} kv heads")
        need(self.norm in ("rmsnorm", "layernorm"), f"norm must be rmsnorm or layernorm, got {self.norm!r}")
        need(self.mlp in ("gated", "plain"), f"mlp must be gated or plain, got {self.mlp!r}")
        need(self.activation in ("silu", "gelu_tanh", "gelu", "relu"), f"unsupported activation {self.activation!r}")
        need(self.position_embedding in ("rope", "learned"), f"bad position_embedding {self.position_embedding!r}")
        need(self.layer_types is None or all(t in ("full", "sliding") for t in self.layer_types),
             "layer_types entries must be 'full' or 'sliding'")
        need(self.sliding_window is None or (_is_int(self.sliding_window) and self.sliding_window > 0),
             f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        need(self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim, "bad partial_rotary_factor")
        if self.num_experts:
            need(0 < self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}")
        layers = self.cross_attention_layers
        need(isinstance(layers, list) and all(_is_int(i) and 0 <= i < self.num_layers for i in layers)
             and len(set(layers)) == len(layers),
             f"cross_attention_layers must be distinct layer indices in 0..{self.num_layers - 1}, got {layers!r}")
        need(self.input_vocab_size is None
             or (_is_int(self.input_vocab_size) and self.input_vocab_size >= self.vocab_size),
             f"input_vocab_size must be at least vocab_size={self.vocab_size}, got {self.input_vocab_size!r}")
        need(not (self.tie_embeddings and self.embedding_rows != self.vocab_size),
             "a tied LM head needs as many input embedding rows as vocabulary entries")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            need(rope_type in SUPPORTED_ROPE_TYPES,
                 f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"config.json model_type {model_type!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        try:
            kwargs = _FROM_HF[model_type](d)
        except ConfigError:  # already names the field (and is a ValueError: keep it from the clause below)
            raise
        except KeyError as e:
            raise ConfigError(f"config.json for {model_type} is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json for {model_type} has a malformed field: {e}") from None
        # OpenELM's sizes come from its multipliers: keep every field so a save writes them back.
        keep = d.keys() if model_type == "openelm" else _KEEP_EXTRA
        kwargs["hf_extra"] = {k: v for k, v in d.items() if k in keep}
        return cls(model_type=model_type, **kwargs)

    def to_hf(self) -> dict[str, Any]:
        d = _TO_HF[self.model_type](self)
        d.update({k: v for k, v in self.hf_extra.items() if k not in d})
        d["model_type"] = self.model_type
        d.setdefault("architectures", [_ARCHITECTURE[self.model_type]])
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count from the config alone (matches ``sum(p.numel())`` of the model)."""
        h = self.hidden_size
        total = self.embedding_rows * h + (0 if self.tie_embeddings else self.vocab_size * h)
        if self.position_embedding == "learned":
            total += self.max_position_embeddings * h
        norm_params = h * (2 if self.norm == "layernorm" else 1)
        for i in range(self.num_layers):
            q, kv, hd = self.heads(i), self.kv_heads(i), self.head_dim
            attn = h * (q + 2 * kv) * hd + q * hd * h
            attn += (q + 2 * kv) * hd if self.attention_bias else 0
            attn += h if self.attention_out_bias else 0
            cross = self.is_cross_attention(i)  # q/k norms always, and two scalar gates
            attn += 2 * hd if (self.qk_norm or cross) else 0
            attn += 2 if cross else 0
            f = self.ffn_size(i)
            mlp = (3 if self.mlp == "gated" else 2) * h * f + ((2 * f + h if self.mlp == "gated" else f + h) if self.mlp_bias else 0)
            if self.num_experts:
                mlp = mlp * self.num_experts + h * self.num_experts
            total += attn + mlp + norm_params * (4 if self.post_norms else 2)
        total += norm_params
        if not include_embeddings:
            total -= self.embedding_rows * h
        return total


class TextConfigView:
    """For a vision-language config whose ``text`` is its decoder's ``Config``: the decoder's fields that
    generation and ``save_model`` read off ``model.config``."""

    text: Config

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def bos_token_id(self) -> int | list[int] | None:
        return self.text.bos_token_id

    @property
    def eos_token_id(self) -> int | list[int] | None:
        return self.text.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.text.pad_token_id

    @property
    def max_position_embeddings(self) -> int:
        return self.text.max_position_embeddings


# ---- typed reads of config.json fields: a wrong type or range names the field, before anything is built ----
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any, key: str, minimum: int = 1) -> int:
    """An integer field; 32.0 is taken as 32, but 32.5, "32", true and null are refused (int() would truncate
    or coerce them into a model of another size)."""
    if not (_is_int(value) or (_is_number(value) and float(value).is_integer())):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key} must be {'positive' if minimum == 1 else f'at least {minimum}'}, got {value!r}")
    return int(value)


def _float(value: Any, key: str, allow_zero: bool = False) -> float:
    """A positive (or, with ``allow_zero``, non-negative) finite number."""
    if not _is_number(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"{key} must be {kind} finite number, got {value!r}")
    return float(value)


def _opt(d: dict[str, Any], key: str, read: Any, default: Any = None) -> Any:
    """``read(d[key], key)``, or ``default`` when the field is absent or null."""
    value = d.get(key)
    return default if value is None else read(value, key)


def _token_ids(d: dict[str, Any], key: str) -> int | list[int] | None:
    value = d.get(key)
    if value is None or _is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value)):
        return value
    raise ConfigError(f"{key} must be a token id or a list of them, got {value!r}")


def _head_dim(d: dict[str, Any], hidden: int, heads: int, hidden_key: str, heads_key: str) -> int:
    """An explicit ``head_dim``, else hidden / heads, which must then divide exactly."""
    if d.get("head_dim") is not None:
        return _int(d["head_dim"], "head_dim")
    if hidden % heads:
        raise ConfigError(f"{hidden_key}={hidden} is not divisible by {heads_key}={heads} (and no head_dim is given)")
    return hidden // heads


_ARCHITECTURE = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gpt2": "GPT2LMHeadModel", "openelm": "OpenELMForCausalLM",
}
# Fields that matter to other tools (tokenizer, generation) and that we carry through a save.
_KEEP_EXTRA = {"architectures", "auto_map", "torch_dtype", "dtype", "initializer_range", "transformers_version",
               "use_cache", "hidden_dropout", "attention_dropout"}

_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _activation(name: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ConfigError(f"activation {name!r} is not supported; supported: {', '.join(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


def _rope_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """transformers v5 nests rope settings in ``rope_parameters``; v4 used ``rope_theta``/``rope_scaling``."""
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    theta = _float(params.pop("rope_theta", d.get("rope_theta", 10000.0)), "rope_theta")
    partial = _float(params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)), "partial_rotary_factor")
    if partial > 1:
        raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {partial!r}")
    scaling.update(params)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "su":  # early Phi-3 name for longrope
        rope_type = "longrope"
    if rope_type == "default" and not ({"factor", "short_factor"} & scaling.keys()):
        scaling = None
    else:
        scaling.pop("type", None)
        scaling["rope_type"] = rope_type
        if rope_type == "longrope":
            scaling.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings"))
    return {"rope_theta": theta, "rope_scaling": scaling, "partial_rotary_factor": partial}


def _rope_to_hf(c: Config) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default"}
    if c.rope_scaling:
        params.update(c.rope_scaling)
    if c.partial_rotary_factor != 1.0:
        params["partial_rotary_factor"] = c.partial_rotary_factor
    # Both spellings, so transformers v4 and v5 read it.
    out: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_parameters": params}
    if c.rope_scaling:
        out["rope_scaling"] = dict(c.rope_scaling)
    if c.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = c.partial_rotary_factor
    return out


def _layer_types_from_hf(d: dict[str, Any]) -> list[str] | None:
    types = d.get("layer_types")
    if not types:
        return None
    return ["sliding" if t == "sliding_attention" else "full" for t in types]


def _llama_like(d: dict[str, Any]) -> dict[str, Any]:
    heads = _int(d["num_attention_heads"], "num_attention_heads")
    hidden = _int(d["hidden_size"], "hidden_size")
    out = dict(
        vocab_size=_int(d["vocab_size"], "vocab_size"), hidden_size=hidden,
        num_layers=_int(d["num_hidden_layers"], "num_hidden_layers"),
        num_heads=heads, num_kv_heads=_opt(d, "num_key_value_heads", _int, heads),
        head_dim=_head_dim(d, hidden, heads, "hidden_size", "num_attention_heads"),
        intermediate_size=_int(d["intermediate_size"], "intermediate_size"),
        max_position_embeddings=_opt(d, "max_position_embeddings", _int, 2048),
        norm_eps=_opt(d, "rms_norm_eps", _float, 1e-6), activation=_activation(d.get("hidden_act", "silu")),
        attention_bias=bool(d.get("attention_bias", False)), attention_out_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)), tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        sliding_window=_opt(d, "sliding_window", _int),
        bos_token_id=_token_ids(d, "bos_token_id"), eos_token_id=_token_ids(d, "eos_token_id"),
        pad_token_id=_token_ids(d, "pad_token_id"),
    )
    out.update(_rope_from_hf(d))
    return out


def _llama_to_hf(c: Config) -> dict[str, Any]:
    d = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
             num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
             intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
             rms_norm_eps=c.norm_eps, hidden_act={"gelu_tanh": "gelu_pytorch_tanh"}.get(c.activation, c.activation),
             tie_word_embeddings=c.tie_embeddings)
    d.update(_rope_to_hf(c))
    if c.model_type == "llama":
        d.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    else:
        d["sliding_window"] = c.sliding_window
    return d


def _from_llama(d: dict[str, Any]) -> dict[str, Any]:
    out = _llama_like(d)
    out["sliding_window"] = None  # Llama has no sliding window, whatever the file says
    return out


def _from_mixtral(d: dict[str, Any]) -> dict[str, Any]:
    out = _llama_like(d)
    out.update(num_experts=_int(d["num_local_experts"], "num_local_experts"),
               num_experts_per_tok=_int(d["num_experts_per_tok"], "num_experts_per_tok"),
               router_aux_loss_coef=_opt(d, "router_aux_loss_coef", lambda v, k: _float(v, k, allow_zero=True), 0.0))
    return out


def _mixtral_to_hf(c: Config) -> dict[str, Any]:
    d = _llama_to_hf(c)
    d.update(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
             router_aux_loss_coef=c.router_aux_loss_coef)
    return d


def _from_qwen2(d: dict[str, Any]) -> dict[str, Any]:
    out = _llama_like(d)
    out.update(attention_bias=True, attention_out_bias=False, mlp_bias=False)
    types = _layer_types_from_hf(d)
    if types is None and d.get("use_sliding_window"):
        max_window_layers = _opt(d, "max_window_layers", lambda v, k: _int(v, k, minimum=0), 0)
        types = ["sliding" if i >= max_window_layers else "full" for i in range(out["num_layers"])]
    if not d.get("use_sliding_window") or not types or "sliding" not in types:
        out["sliding_window"], types = None, None
    out["layer_types"] = types
    return out


def _qwen2_to_hf(c: Config) -> dict[str, Any]:
    d = _llama_to_hf(c)
    d["use_sliding_window"] = c.sliding_window is not None
    if c.layer_types:
        d["layer_types"] = [t + "_attention" for t in c.layer_types]
        d["max_window_layers"] = c.layer_types.index("sliding") if "sliding" in c.layer_types else c.num_layers
    return d


def _from_phi3(d: dict[str, Any]) -> dict[str, Any]:
    out = _llama_like(d)
    out["attention_bias"] = out["attention_out_bias"] = out["mlp_bias"] = False
    return out


def _phi3_to_hf(c: Config) -> dict[str, Any]:
    d = _llama_to_hf(c)
    if c.rope_scaling and "original_max_position_embeddings" in c.rope_scaling:
        d["original_max_position_embeddings"] = c.rope_scaling["original_max_position_embeddings"]
    return d


def _from_gemma2(d: dict[str, Any]) -> dict[str, Any]:
    out = _llama_like(d)
    out.update(
        activation=_activation(d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"),
        norm_unit_offset=True, post_norms=True,
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        embedding_multiplier=math.sqrt(out["hidden_size"]),
        attention_scale=_opt(d, "query_pre_attn_scalar", _float, out["head_dim"]) ** -0.5,
        attn_logit_softcap=_opt(d, "attn_logit_softcapping", _float),
        final_logit_softcap=_opt(d, "final_logit_softcapping", _float),
        attention_out_bias=False, mlp_bias=False,
    )
    types = _layer_types_from_hf(d)
    if types is None:  # transformers v4: even layers are local (sliding), odd are global
        types = ["sliding" if i % 2 == 0 else "full" for i in range(out["num_layers"])]
    out["layer_types"] = types
    return out


def _gemma2_to_hf(c: Config) -> dict[str, Any]:
    d = _llama_to_hf(c)
    d.pop("hidden_act")
    d.update(hidden_activation={"gelu_tanh": "gelu_pytorch_tanh"}.get(c.activation, c.activation),
             query_pre_attn_scalar=round((c.attention_scale or c.head_dim ** -0.5) ** -2),
             attn_logit_softcapping=c.attn_logit_softcap, final_logit_softcapping=c.final_logit_softcap,
             attention_bias=c.attention_bias,
             layer_types=[t + "_attention" for t in (c.layer_types or ["full"] * c.num_layers)])
    return d


def _from_gpt2(d: dict[str, Any]) -> dict[str, Any]:
    if d.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError("GPT-2 scale_attn_by_inverse_layer_idx=true is not supported")
    hidden, heads = _int(d["n_embd"], "n_embd"), _int(d["n_head"], "n_head")
    if hidden % heads:
        raise ConfigError(f"n_embd={hidden} is not divisible by n_head={heads}")
    return dict(
        vocab_size=_int(d["vocab_size"], "vocab_size"), hidden_size=hidden, num_layers=_int(d["n_layer"], "n_layer"),
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=_opt(d, "n_inner", _int, 4 * hidden),
        max_position_embeddings=_int(d["n_positions"], "n_positions"), norm="layernorm",
        norm_eps=_opt(d, "layer_norm_epsilon", _float, 1e-5),
        mlp="plain", activation=_activation(d.get("activation_function", "gelu_new")), attention_bias=True,
        attention_out_bias=True, mlp_bias=True, position_embedding="learned",
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        attention_scale=None if d.get("scale_attn_weights", True) else 1.0,
        bos_token_id=_token_ids(d, "bos_token_id"), eos_token_id=_token_ids(d, "eos_token_id"),
        pad_token_id=_token_ids(d, "pad_token_id"),
    )


def _gpt2_to_hf(c: Config) -> dict[str, Any]:
    return dict(vocab_size=c.vocab_size, n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_heads,
                n_inner=c.intermediate_size, n_positions=c.max_position_embeddings, layer_norm_epsilon=c.norm_eps,
                activation_function={"gelu_tanh": "gelu_new"}.get(c.activation, c.activation),
                tie_word_embeddings=c.tie_embeddings, scale_attn_weights=c.attention_scale is None,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """OpenELM's rounding (from MobileNet): nearest multiple of divisor, never below 90% of value."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def openelm_layer_sizes(d: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """Per-layer (query heads, kv heads, FFN width) from OpenELM's layer-wise scaling multipliers.

    Follows Apple's ``OpenELMConfig.__post_init__``: multipliers are linearly interpolated from the
    first to the last layer, rounded to 2 decimals; heads = make_divisible(model_dim * q_mult,
    head_dim * num_gqa_groups) / head_dim; kv heads = heads / num_gqa_groups; FFN = make_divisible(model_dim * f_mult, ffn_dim_divisor).
    """
    import numpy as np

    n_layers = _int(d["num_transformer_layers"], "num_transformer_layers")
    model_dim, head_dim = _int(d["model_dim"], "model_dim"), _int(d["head_dim"], "head_dim")
    groups, divisor = _opt(d, "num_gqa_groups", _int, 1), _opt(d, "ffn_dim_divisor", _int, 256)

    def per_layer(mult: Any) -> list[float]:
        if isinstance(mult, (int, float)):
            return [float(mult)] * n_layers
        if isinstance(mult, (list, tuple)) and len(mult) == 2:
            return [round(float(v), 2) for v in np.linspace(mult[0], mult[1], num=n_layers, dtype=float)]
        if isinstance(mult, (list, tuple)) and len(mult) == n_layers:
            return [float(v) for v in mult]
        raise ConfigError(f"OpenELM multiplier {mult!r} must be a number, a [start, end] pair or one per layer")

    head_multiple = groups or 2
    q_heads = [int(make_divisible(model_dim * m, head_dim * head_multiple)) // head_dim
               for m in per_layer(d["qkv_multipliers"])]
    kv_heads = [q // groups for q in q_heads]
    ffn = [int(make_divisible(model_dim * m, divisor)) for m in per_layer(d["ffn_multipliers"])]
    return q_heads, kv_heads, ffn


def _from_openelm(d: dict[str, Any]) -> dict[str, Any]:
    if d.get("ffn_with_glu", True) is not True:
        raise ConfigError("OpenELM with ffn_with_glu=false is not supported")
    q_heads, kv_heads, ffn = openelm_layer_sizes(d)
    n_layers = _int(d["num_transformer_layers"], "num_transformer_layers")
    return dict(
        vocab_size=_int(d["vocab_size"], "vocab_size"), hidden_size=_int(d["model_dim"], "model_dim"),
        num_layers=n_layers, num_heads=max(q_heads), num_kv_heads=max(kv_heads), head_dim=_int(d["head_dim"], "head_dim"),
        intermediate_size=max(ffn), max_position_embeddings=_opt(d, "max_context_length", _int, 2048),
        layer_num_heads=q_heads, layer_num_kv_heads=kv_heads, layer_intermediate_size=ffn,
        norm_eps=1e-6, qk_norm=bool(d.get("normalize_qk_projections", True)),
        activation=_activation(d.get("activation_fn_name", "swish")),
        rope_theta=_opt(d, "rope_freq_constant", _float, 10000.0),
        tie_embeddings=bool(d.get("share_input_output_layers", True)),
        bos_token_id=_token_ids(d, "bos_token_id"), eos_token_id=_token_ids(d, "eos_token_id"),
        pad_token_id=_token_ids(d, "pad_token_id"),
    )


def _openelm_to_hf(c: Config) -> dict[str, Any]:
    # OpenELM configs are defined by their multipliers; we keep the originals in hf_extra.
    missing = {"qkv_multipliers", "ffn_multipliers"} - c.hf_extra.keys()
    if missing:
        raise ConfigError("cannot write an OpenELM config.json without its original multipliers")
    return dict(vocab_size=c.vocab_size, model_dim=c.hidden_size, num_transformer_layers=c.num_layers,
                head_dim=c.head_dim, max_context_length=c.max_position_embeddings,
                normalize_qk_projections=c.qk_norm, rope_freq_constant=c.rope_theta,
                share_input_output_layers=c.tie_embeddings, ffn_with_glu=True,
                activation_fn_name={"silu": "swish"}.get(c.activation, c.activation))


_FROM_HF = {"llama": _from_llama, "mistral": _llama_like, "mixtral": _from_mixtral, "qwen2": _from_qwen2,
            "phi3": _from_phi3, "gemma2": _from_gemma2, "gpt2": _from_gpt2, "openelm": _from_openelm}
_TO_HF = {"llama": _llama_to_hf, "mistral": _llama_to_hf, "mixtral": _mixtral_to_hf, "qwen2": _qwen2_to_hf,
          "phi3": _phi3_to_hf, "gemma2": _gemma2_to_hf, "gpt2": _gpt2_to_hf, "openelm": _openelm_to_hf}
