"""LoRA and DoRA adapters for our Transformer, saved and loaded in PEFT's on-disk format.

A wrapped layer keeps the base ``weight``/``bias`` under their original names, so
``state_dict`` keys of the base model (and ``hf_state_dict``/``save_model``) are unchanged;
the adapter adds ``lora_A``, ``lora_B`` and, for DoRA, ``lora_magnitude``.

LoRA:  y = W x + b + s * B A dropout(x),                       s = alpha / r
DoRA:  y = m / ||W + s B A||_row * (W + s B A) x + b          (the norm is detached, DoRA paper sec. 4.3)

QLoRA: over a model quantized by ``lmforge.models.quant`` (``load_model(path, quantize="int4"|"int8")``, or
``LoraConfig(base_quantization=...)`` to quantize a float model here), ``apply_lora`` wraps each target
``QuantizedLinear`` in a ``QLoraLinear``: the base stays frozen and quantized, kept as the child ``base_layer``
(so its tensors are ``<name>.base_layer.packed`` etc.), and the adapter is float32. No float copy of a base
weight is kept: the base output comes from the low-bit kernel, gradients reach the input through the kernel's
custom backward (``QuantizedLinear.matmul``), and DoRA's row norms ||W + s B A|| are computed from the weight
dequantized tile by tile in each forward. Non-target quantized layers stay quantized and pass gradients too.

Saving a QLoRA model: the adapter is PEFT format as for a float base (``save_adapter``; it belongs on the
*dequantized* base, which is what it was trained against). ``merge_lora`` on a QLoRA model gives the float model
it computes: each adapter folded into its layer's dequantized weight and every other quantized layer dequantized
(``lmforge.models.quant.dequantize_model``), so the trainer's ``model/`` directory is a plain float32 checkpoint
that transformers, ``load_model`` and ``lmforge generate`` load (and ``lmforge quantize`` can quantize again). It
matches the trained model up to the kernels' bfloat16 rounding of activations. It is *not* the adapter merged into
the original float checkpoint: that model (``adapter/`` over ``base_model_name_or_path``) differs by the
quantization error the adapter was trained around. A tied-embedding model whose LM head was quantized is saved
tied (the trainer re-ties), i.e. with the float embedding as its head.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.io import atomic_directory, read_json_object
from lmforge.models.checkpoint import weight_map
from lmforge.models.model import replace_submodule
from lmforge.models.quant import QuantConfig, QuantizedLinear, dequantize_model, quantization_of, quantize_model

ALL_LINEAR = "all-linear"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model
# Our parameter name -> PEFT's tensor suffix (PEFT stores the magnitude without ".weight").
_PEFT_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module-name suffixes as in PEFT ("q_proj" matches "model.layers.0.self_attn.q_proj");
    # "all-linear" means every Linear except lm_head.
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_dora: bool = False
    # QLoRA: the quantization of the frozen base, None for a float base. apply_lora quantizes a float model to it
    # before wrapping and fills it in when it wraps an already quantized model, so this config alone rebuilds the
    # trained structure (the trainer's export applies it to a fresh model on the meta device).
    base_quantization: QuantConfig | None = None

    def __post_init__(self) -> None:
        # Recipes hand over lists, and PEFT allows a bare "all-linear" string.
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"lora r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"lora alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"lora target_modules must be a non-empty list of module names, "
                              f"got {self.target_modules!r}")
        if self.base_quantization is not None and not isinstance(self.base_quantization, QuantConfig):
            raise ConfigError(f"lora base_quantization must be a lmforge.models.quant.QuantConfig or None, "
                              f"got {self.base_quantization!r}")


# ---- the layer -----------------------------------------------------------------------------------
class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank (optionally DoRA) update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_dora: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device, base_dtype = self._hold_base(base)
        # Half-precision bases get float32 adapters (as PEFT does by default): tiny updates survive.
        dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        # PEFT's default init: A like nn.Linear's own init, B = 0 so the wrapped model starts unchanged.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude: nn.Parameter | None = None
        if use_dora:
            # m starts at the row norms of W (B = 0), so DoRA too starts as the identity.
            self.lora_magnitude = nn.Parameter(self._weight_norm())

    # -- the base: what a subclass over another kind of frozen linear replaces --
    def _hold_base(self, base: nn.Linear) -> tuple[torch.device, torch.dtype]:
        """Keep the frozen base; returns (device, dtype) for the adapter to follow."""
        # Take over the base parameters themselves (not copies): same names in state_dict, no extra memory.
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        return base.weight.device, base.weight.dtype

    def _base(self, x: Tensor, with_bias: bool = True) -> Tensor:
        """W x (+ b)."""
        return F.linear(x, self.weight.to(x.dtype), self.bias if with_bias else None)

    def _weight_tiles(self) -> Iterator[tuple[slice, Tensor]]:
        """(output rows, W of those rows) covering W."""
        yield slice(None), self.weight

    # -- the adapter --
    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude is not None

    def delta_weight(self, rows: slice = slice(None)) -> Tensor:
        """s * B A (of output ``rows``), in the adapter dtype."""
        return (self.lora_B[rows] @ self.lora_A) * self.scaling

    def _weight_norm(self) -> Tensor:
        """||W + s B A|| per output row, detached: DoRA treats it as a constant for the gradient."""
        with torch.no_grad():
            return torch.cat([torch.linalg.vector_norm(w.to(self.lora_A.dtype) + self.delta_weight(rows), dim=1)
                              for rows, w in self._weight_tiles()])

    def forward(self, x: Tensor) -> Tensor:
        result = self._base(x)
        xa = x.to(self.lora_A.dtype)
        dropped = self.training and isinstance(self.dropout, nn.Dropout)
        xd = self.dropout(xa) if dropped else xa
        lora = F.linear(F.linear(xd, self.lora_A), self.lora_B) * self.scaling
        if self.lora_magnitude is None:
            return result + lora.to(result.dtype)
        scale = self.lora_magnitude / self._weight_norm()
        # W x_d: reuse the base output unless dropout changed the input (PEFT does the same).
        if dropped:
            wx = self._base(xd, with_bias=False)
        else:
            wx = (result if self.bias is None else result - self.bias).to(xd.dtype)
        # = m/||.|| (W + sBA) x_d + b, written as a correction on top of the base output.
        return result + ((scale - 1) * wx + scale * lora).to(result.dtype)

    def merged_weight(self) -> Tensor:
        base = self.weight
        w = base.to(self.lora_A.dtype) + self.delta_weight()
        if self.lora_magnitude is not None:
            w = w * (self.lora_magnitude / torch.linalg.vector_norm(w, dim=1))[:, None]
        return w.to(base.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dora={self.use_dora}")


class QLoraLinear(LoraLinear):
    """A frozen ``QuantizedLinear`` (kept whole as ``base_layer``) plus a float32 low-rank (optionally DoRA)
    update: QLoRA (module docstring). ``weight`` dequantizes on each access, as the quantized layer's does."""

    base_layer: QuantizedLinear

    def _hold_base(self, base: QuantizedLinear) -> tuple[torch.device, torch.dtype]:
        self.base_layer = base  # buffers only: nothing in it can train
        return base.packed.device, torch.float32

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def _base(self, x: Tensor, with_bias: bool = True) -> Tensor:
        y = self.base_layer.matmul(x)
        return y + self.bias if with_bias and self.bias is not None else y

    def _weight_tiles(self) -> Iterator[tuple[slice, Tensor]]:
        return self.base_layer.dequantized_tiles()


# ---- applying, merging ---------------------------------------------------------------------------
def _matches(name: str, targets: tuple[str, ...]) -> bool:
    if ALL_LINEAR in targets:
        return name.rsplit(".", 1)[-1] != "lm_head"
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_base_linear(module: nn.Module) -> bool:
    """A layer adapters can wrap: a plain ``nn.Linear`` (not a subclass with other math) or a quantized one."""
    return type(module) is nn.Linear or isinstance(module, QuantizedLinear)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if _is_base_linear(m)]


def _match_base_quantization(model: nn.Module, config: LoraConfig) -> None:
    """Quantize a float model to ``config.base_quantization``, or record a quantized model's quantization there."""
    quantized = quantization_of(model)
    if quantized is None and config.base_quantization is not None:
        quantize_model(model, config.base_quantization)
    elif config.base_quantization is None:
        config.base_quantization = quantized
    elif quantized != config.base_quantization:
        raise LmforgeError(f"the model is quantized ({quantized.describe()}) but the LoRA config's base_quantization "
                           f"is {config.base_quantization.describe()}")


def _wrap(model: nn.Module, names: list[str], config: LoraConfig) -> None:
    for name in names:
        base = model.get_submodule(name)
        layer = QLoraLinear if isinstance(base, QuantizedLinear) else LoraLinear
        replace_submodule(model, name, layer(base, config.r, config.alpha, config.dropout, config.use_dora))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap the target Linears in place and freeze everything else; returns the wrapped module names.
    QLoRA (module docstring): a quantized model's ``QuantizedLinear`` layers are wrapped as ``QLoraLinear``; with
    ``config.base_quantization`` set a float model is quantized first, else it is set from a quantized model."""
    config.validate()
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise LmforgeError("the model already has LoRA adapters; merge_lora() it first")
    _match_base_quantization(model, config)
    candidates = _linear_names(model)
    names = [n for n in candidates if _matches(n, config.target_modules)]
    if not names:
        available = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ConfigError(f"lora target_modules {list(config.target_modules)} match no Linear layer; "
                          f"available: {', '.join(available)} (or '{ALL_LINEAR}')")
    _wrap(model, names, config)
    return names


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for m in model.modules():
        if isinstance(m, LoraLinear):
            yield m.lora_A
            yield m.lora_B
            if m.lora_magnitude is not None:
                yield m.lora_magnitude


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put a plain ``nn.Linear`` back. A QLoRA model becomes the
    float model it computes (module docstring): adapters folded into the dequantized weights, the other quantized
    layers dequantized."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    for name, m in wrapped:
        with torch.no_grad():
            merged = m.merged_weight()
        # Built on meta so the throwaway init costs nothing, then given the real tensors.
        linear = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(merged, requires_grad=False)
        bias = m.bias
        if bias is not None and not isinstance(bias, nn.Parameter):  # a quantized base's bias is a buffer
            bias = nn.Parameter(bias, requires_grad=False)
        linear.bias = bias
        replace_submodule(model, name, linear)
    if quantization_of(model) is not None:
        dequantize_model(model)


# ---- PEFT names ----------------------------------------------------------------------------------
def _hf_module_names(model: nn.Module) -> dict[str, str | None]:
    """Our Linear name -> the module name PEFT sees in the transformers model, or None when that
    layer has no Linear of its own there (fused qkv/gate_up, GPT-2 Conv1D, Mixtral's fused experts)."""
    config = getattr(model, "config", None)
    if config is None:
        raise LmforgeError("save/load_adapter needs an lmforge Transformer (it has no .config)")
    out: dict[str, str | None] = {}
    for tm in weight_map(config):
        if not tm.hf.endswith(".weight"):
            continue
        for ours in tm.ours:
            module = ours.removesuffix(".weight")
            simple = len(tm.ours) == 1 and not tm.transpose and ".block_sparse_moe." not in tm.hf
            out[module] = tm.hf.removesuffix(".weight") if simple else None
    return out


def _peft_names(model: nn.Module, ours: list[str]) -> dict[str, str]:
    hf = _hf_module_names(model)
    bad = [n for n in ours if hf.get(n) is None]
    if bad:
        kind = model.config.model_type
        raise LmforgeError(
            f"cannot express LoRA on {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} in PEFT format: "
            f"in the transformers {kind} model this layer is fused with others or not an nn.Linear "
            f"(e.g. Phi-3 qkv_proj/gate_up_proj, GPT-2 Conv1D, Mixtral experts); target other modules "
            f"or merge_lora() and save the full model instead")
    return {n: hf[n] for n in ours}


# ---- saving, loading -----------------------------------------------------------------------------
def _adapter_target_modules(model: nn.Module, wrapped: list[str], peft: dict[str, str]) -> list[str]:
    """Short suffixes ("q_proj") when they select exactly the wrapped layers, else the full HF names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    if set(wrapped) == {n for n in _linear_names(model) + wrapped if _matches(n, tuple(leaves))}:
        return leaves
    return sorted(peft.values())


def save_adapter(model: nn.Module, path: str | os.PathLike, config: LoraConfig,
                 base_model: str | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel`` loads."""
    config.validate()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    if not layers:
        raise LmforgeError("the model has no LoRA adapters to save; call apply_lora() first")
    for name, m in layers.items():
        if m.r != config.r or m.alpha != config.alpha or m.use_dora != config.use_dora:
            raise LmforgeError(f"{name} has r={m.r}, alpha={m.alpha}, dora={m.use_dora}, but the LoraConfig "
                               f"says r={config.r}, alpha={config.alpha}, dora={config.use_dora}")
    peft = _peft_names(model, list(layers))
    tensors: dict[str, Tensor] = {}
    for name, m in layers.items():
        for attr, suffix in _PEFT_SUFFIX.items():
            t = getattr(m, attr)
            if t is not None:
                tensors[f"{_PEFT_PREFIX}{peft[name]}.{suffix}"] = t.detach().cpu().contiguous()
    adapter_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _adapter_target_modules(model, list(layers), peft),
        "use_dora": config.use_dora,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with atomic_directory(path) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))


def _read_adapter_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a PEFT adapter directory)")
    if not file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}; is it a PEFT LoRA adapter directory?")
    raw = read_json_object(file, CheckpointError)
    # Features whose math we do not implement: refuse rather than load something different.
    unsupported = {
        "peft_type": raw.get("peft_type", "LORA") != "LORA",
        "use_rslora": bool(raw.get("use_rslora")),
        "rank_pattern": bool(raw.get("rank_pattern")),
        "alpha_pattern": bool(raw.get("alpha_pattern")),
        "bias": raw.get("bias", "none") != "none",
        "lora_bias": bool(raw.get("lora_bias")),
        "modules_to_save": bool(raw.get("modules_to_save")),
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out")),
        "layer_replication": bool(raw.get("layer_replication")),
    }
    bad = [f"{k}={raw.get(k)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{file}: unsupported adapter settings for lmforge: {', '.join(bad)}")
    return raw


def load_adapter(model: nn.Module, path: str | os.PathLike) -> LoraConfig:
    """Read a PEFT LoRA/DoRA adapter into ``model`` (in place: wraps, freezes, loads); returns its config."""
    path = Path(path)
    raw = _read_adapter_config(path)
    targets = raw.get("target_modules") or ()
    try:
        config = LoraConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                            target_modules=targets, use_dora=bool(raw.get("use_dora", False)))
        config.validate()
    except KeyError as e:
        raise CheckpointError(f"{path / CONFIG_FILE} has no {e.args[0]!r} field") from None
    except ConfigError as e:
        raise ConfigError(f"{path / CONFIG_FILE}: {e}") from None

    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE} (lmforge reads only safetensors adapters)")
    try:
        with safe_open(file, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file ({e}); it may be truncated or corrupt") from None

    # The tensors, not target_modules (which PEFT also allows as a regex), say which layers have adapters.
    from_hf = {hf: ours for ours, hf in _hf_module_names(model).items() if hf is not None}
    state: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        module, attr = _split_peft_key(key)
        if module is None or module not in from_hf:
            unknown.append(key)
        else:
            state.setdefault(from_hf[module], {})[attr] = t
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise CheckpointError(f"{file}: tensors that match no layer of this {model.config.model_type} model: "
                              f"{', '.join(sorted(unknown)[:3])}{more}")
    if not state:
        raise CheckpointError(f"{file} holds no LoRA tensors")
    linear = {n: m for n, m in model.named_modules() if _is_base_linear(m)}
    not_linear = sorted(set(state) - set(linear))
    if not_linear:
        raise LmforgeError(f"cannot load adapters into {', '.join(not_linear[:3])}: not plain Linear layers "
                           f"(does the model already have adapters?)")
    # Check every tensor before touching the model, so a bad file leaves it as it was.
    want_keys = {"lora_A", "lora_B"} | ({"lora_magnitude"} if config.use_dora else set())
    names = [n for n in linear if n in state]  # model order, not file order
    for name in names:
        got = state[name]
        if set(got) != want_keys:
            raise CheckpointError(f"{file}: {name} has tensors {sorted(got)}, expected {sorted(want_keys)} "
                                  f"(use_dora={config.use_dora})")
        base = linear[name]
        shapes = {"lora_A": (config.r, base.in_features), "lora_B": (base.out_features, config.r),
                  "lora_magnitude": (base.out_features,)}
        for attr, t in got.items():
            if tuple(t.shape) != shapes[attr]:
                raise CheckpointError(f"{file}: {_PEFT_SUFFIX[attr]} of {name} has shape {list(t.shape)}, "
                                      f"expected {list(shapes[attr])} (r={config.r}); wrong base model?")
    config.base_quantization = quantization_of(model)
    _wrap(model, names, config)
    for name in names:
        layer = model.get_submodule(name)
        with torch.no_grad():
            for attr, t in state[name].items():
                getattr(layer, attr).copy_(t)
    if isinstance(targets, str) and targets != ALL_LINEAR:
        # A PEFT regex: report the layer names it selected, which apply_lora understands.
        config.target_modules = tuple(sorted({n.rsplit(".", 1)[-1] for n in names}))
    return config


def _split_peft_key(key: str) -> tuple[str | None, str]:
    """'base_model.model.X.lora_A.weight' -> ('X', 'lora_A'); (None, '') if it is no LoRA tensor."""
    if key.startswith(_PEFT_PREFIX):
        for attr, suffix in _PEFT_SUFFIX.items():
            if key.endswith("." + suffix):
                return key[len(_PEFT_PREFIX):-len(suffix) - 1], attr
    return None, ""


__all__ = ["LoraConfig", "LoraLinear", "QLoraLinear", "apply_lora", "lora_parameters", "merge_lora", "save_adapter",
           "load_adapter"]
