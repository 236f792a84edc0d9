"""Hugging Face checkpoints in and out: config.json + (sharded) safetensors.

Each architecture's tensor names are data: ``weight_map(config)`` lists, for every tensor in the
HF checkpoint, which of our parameters it holds (several when the checkpoint fuses them, e.g.
Phi-3's qkv_proj) and whether it is stored transposed (GPT-2's Conv1D).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.io import atomic_directory, atomic_file, read_json_object
from lmforge.models.device import pick_device
from lmforge.models.config import Config
from lmforge.models.model import Transformer

if TYPE_CHECKING:
    from lmforge.models.quant import QuantConfig

# Buffers some checkpoints carry that hold no weights (recomputed at run time).
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


@dataclass(frozen=True)
class TensorMap:
    hf: str
    ours: tuple[str, ...]  # concatenated along dim 0 in the checkpoint when several
    transpose: bool = False


def weight_map(config: Config) -> list[TensorMap]:
    if config.model_type == "llava":  # a LlavaConfig: vision tower + projector + this decoder's map, prefixed
        from lmforge.models.llava import llava_weight_map  # it imports this module

        return llava_weight_map(config)
    if config.model_type == "mllama":  # a MllamaConfig: tiled vision encoder + projector + cross-attention decoder
        from lmforge.models.mllama import mllama_weight_map  # it imports this module

        return mllama_weight_map(config)
    maps: list[TensorMap] = []

    def add(hf: str, *ours: str, transpose: bool = False) -> None:
        maps.append(TensorMap(hf, tuple(ours), transpose))

    def norm(hf: str, ours: str) -> None:
        add(f"{hf}.weight", f"{ours}.weight")
        if config.norm == "layernorm":
            add(f"{hf}.bias", f"{ours}.bias")

    def linear(hf: str, *ours: str, bias: bool, transpose: bool = False) -> None:
        add(f"{hf}.weight", *(f"{o}.weight" for o in ours), transpose=transpose)
        if bias:
            add(f"{hf}.bias", *(f"{o}.bias" for o in ours))

    kind = config.model_type
    for i in range(config.num_layers):
        us = f"model.layers.{i}"
        attn, mlp = f"{us}.self_attn", f"{us}.mlp"
        qkv = (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj")
        if kind == "gpt2":
            hf = f"transformer.h.{i}"
            norm(f"{hf}.ln_1", f"{us}.attn_norm")
            linear(f"{hf}.attn.c_attn", *qkv, bias=True, transpose=True)
            linear(f"{hf}.attn.c_proj", f"{attn}.o_proj", bias=True, transpose=True)
            norm(f"{hf}.ln_2", f"{us}.mlp_norm")
            linear(f"{hf}.mlp.c_fc", f"{mlp}.up_proj", bias=True, transpose=True)
            linear(f"{hf}.mlp.c_proj", f"{mlp}.down_proj", bias=True, transpose=True)
            continue
        if kind == "openelm":
            hf = f"transformer.layers.{i}"
            norm(f"{hf}.attn_norm", f"{us}.attn_norm")
            linear(f"{hf}.attn.qkv_proj", *qkv, bias=False)
            norm(f"{hf}.attn.q_norm", f"{attn}.q_norm")
            norm(f"{hf}.attn.k_norm", f"{attn}.k_norm")
            linear(f"{hf}.attn.out_proj", f"{attn}.o_proj", bias=False)
            norm(f"{hf}.ffn_norm", f"{us}.mlp_norm")
            linear(f"{hf}.ffn.proj_1", f"{mlp}.gate_proj", f"{mlp}.up_proj", bias=False)
            linear(f"{hf}.ffn.proj_2", f"{mlp}.down_proj", bias=False)
            continue
        hf = f"model.layers.{i}"
        norm(f"{hf}.input_layernorm", f"{us}.attn_norm")
        if kind == "gemma2":
            norm(f"{hf}.post_attention_layernorm", f"{us}.attn_out_norm")
            norm(f"{hf}.pre_feedforward_layernorm", f"{us}.mlp_norm")
            norm(f"{hf}.post_feedforward_layernorm", f"{us}.mlp_out_norm")
        else:
            norm(f"{hf}.post_attention_layernorm", f"{us}.mlp_norm")
        if kind == "phi3":
            linear(f"{hf}.self_attn.qkv_proj", *qkv, bias=False)
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                linear(f"{hf}.self_attn.{name}", f"{attn}.{name}", bias=config.attention_bias)
        linear(f"{hf}.self_attn.o_proj", f"{attn}.o_proj", bias=config.attention_out_bias)
        if config.num_experts:
            add(f"{hf}.block_sparse_moe.gate.weight", f"{mlp}.gate.weight")
            for e in range(config.num_experts):
                ex, ours = f"{hf}.block_sparse_moe.experts.{e}", f"{mlp}.experts.{e}"
                add(f"{ex}.w1.weight", f"{ours}.gate_proj.weight")
                add(f"{ex}.w2.weight", f"{ours}.down_proj.weight")
                add(f"{ex}.w3.weight", f"{ours}.up_proj.weight")
        elif kind == "phi3":
            linear(f"{hf}.mlp.gate_up_proj", f"{mlp}.gate_proj", f"{mlp}.up_proj", bias=False)
            linear(f"{hf}.mlp.down_proj", f"{mlp}.down_proj", bias=False)
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear(f"{hf}.mlp.{name}", f"{mlp}.{name}", bias=config.mlp_bias)

    if kind == "gpt2":
        add("transformer.wte.weight", "model.embed_tokens.weight")
        add("transformer.wpe.weight", "model.embed_positions.weight")
        norm("transformer.ln_f", "model.norm")
    elif kind == "openelm":
        add("transformer.token_embeddings.weight", "model.embed_tokens.weight")
        norm("transformer.norm", "model.norm")
    else:
        add("model.embed_tokens.weight", "model.embed_tokens.weight")
        norm("model.norm", "model.norm")
    if not config.tie_embeddings:
        add("lm_head.weight", "lm_head.weight")
    return maps


# ---- reading -----------------------------------------------------------------------------------
GGUF_UNSUPPORTED = ("{path} is a GGUF file: this needs a Hugging Face model directory (config.json, safetensors, "
                    "tokenizer.json); GGUF files are read by load_model and load_tokenizer")


def read_generation_config(path: str | os.PathLike) -> dict | None:
    """The directory's ``generation_config.json`` as a dict, or None when it has none."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return None
    return read_json_object(file, CheckpointError)


def config_model_type(path: str | os.PathLike) -> str | None:
    """The ``model_type`` of the directory's config.json; None without one (a malformed file is left to the
    loader to report)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def read_model_config(path: str | os.PathLike, from_hf: Callable[[dict[str, Any]], Any]) -> Any:
    """``from_hf`` of the directory's config.json; a ConfigError names the file."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        return from_hf(read_json_object(file, CheckpointError))
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def read_config(path: str | os.PathLike) -> Config:
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise CheckpointError(GGUF_UNSUPPORTED.format(path=path))
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model directory)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face model directory?")
    raw = read_json_object(cfg_file, CheckpointError)
    try:
        return Config.from_hf(raw)
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None


class _TensorSource:
    """Tensor name -> file for a single or sharded safetensors checkpoint; opens files lazily."""

    def __init__(self, path: Path) -> None:
        index, single = path / "model.safetensors.index.json", path / "model.safetensors"
        if index.is_file():
            try:
                weight_files = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is malformed: {e}") from None
            self.files = {name: path / fname for name, fname in weight_files.items()}
            for f in set(self.files.values()):
                if not f.is_file():
                    raise CheckpointError(f"{index} names the shard {f.name}, which does not exist in {path}")
        elif single.is_file():
            self.files = {name: single for name in self._keys(single)}
        else:
            other = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = (f" It has {', '.join(sorted(other))}: lmforge reads only safetensors (pickled weights "
                    "can run code when loaded); convert them first.") if other else ""
            raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json.{hint}")
        self._open: dict[Path, object] = {}

    @staticmethod
    def _keys(file: Path) -> list[str]:
        try:
            with safe_open(file, "pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors file ({e}); it may be truncated or corrupt") from None

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> torch.Tensor:
        file = self.files[name]
        try:
            if file not in self._open:
                self._open[file] = safe_open(file, "pt")
            return self._open[file].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({e}); the file may be truncated or corrupt") from None


def _place(state: dict[str, torch.Tensor], tensor: torch.Tensor, tm: TensorMap, expected: dict[str, torch.Tensor],
           dtype: torch.dtype, device: torch.device | str, what: str) -> None:
    """A checkpoint tensor into ``state`` under our name(s): transposed where the map says, its shape checked against
    ``expected`` (an error starting with ``what``), split where the checkpoint fuses several of ours (Phi-3's
    qkv_proj), cast and moved."""
    if tm.transpose:
        tensor = tensor.t()
    sizes = [expected[o].shape[0] for o in tm.ours]
    want = (sum(sizes), *expected[tm.ours[0]].shape[1:])
    if tuple(tensor.shape) != tuple(want):
        raise CheckpointError(f"{what} has shape {list(tensor.shape)}, expected {list(want)} from config.json")
    for ours, part in zip(tm.ours, tensor.split(sizes, dim=0)):
        state[ours] = part.to(dtype=dtype, device=device).contiguous()


def read_mapped_state(path: Path, expected: dict[str, torch.Tensor], maps: Iterable[TensorMap], dtype: torch.dtype,
                      device: torch.device, kind: str, needed_for: str,
                      canonical: Callable[[str], str] = lambda name: name,
                      optional: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The state dict of a model whose parameters ``expected`` (e.g. a meta-device model's ``state_dict()``)
    come from the checkpoint at ``path`` through ``maps``, for the composite (vision-language) models.

    File names go through ``canonical`` first (one spelling per transformers layout). Each error is a
    ``CheckpointError`` naming the tensor: one missing (``needed_for`` says what for), a shape other than the
    config implies, two spellings of one name, or a tensor the maps do not read (``optional`` ones excepted,
    e.g. the head of a tied checkpoint; ``kind`` names the model family)."""
    source = _TensorSource(path)
    names: dict[str, str] = {}
    for name in source.names():
        canonical_name = canonical(name)
        if canonical_name in names:
            raise CheckpointError(f"{path}: tensors {names[canonical_name]} and {name} are the same weight in two "
                                  "layouts")
        names[canonical_name] = name
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set(optional)
    for tm in maps:
        if tm.hf not in names:
            raise CheckpointError(f"{path}: missing tensor {tm.hf} (needed for {needed_for})")
        used.add(tm.hf)
        _place(state, source.get(names[tm.hf]), tm, expected, dtype, device, f"{path}: tensor {names[tm.hf]}")
    unexpected = sorted(names[n] for n in set(names) - used if not _IGNORED.match(n))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: unexpected tensors for {kind}: {', '.join(unexpected[:5])}{more}; is "
                              "config.json for this checkpoint?")
    return state


def _normalise_names(config: Config, names: set[str]) -> dict[str, str]:
    """Map canonical HF names to the names in this file (GPT-2 files may lack 'transformer.')."""
    out = {n: n for n in names}
    if config.model_type == "gpt2":
        out.update({f"transformer.{n}": n for n in names if not n.startswith(("transformer.", "lm_head."))})
    return out


# Where an architecture's checkpoint keeps decoder layer i (canonical names, see ``_normalise_names``), and
# the config.json field that counts the layers.
_LAYERS = {"gpt2": ("transformer.h.", "n_layer"), "openelm": ("transformer.layers.", "num_transformer_layers")}
_LAYERS_DEFAULT = ("model.layers.", "num_hidden_layers")


def _check_layer_count(path: Path, config: Config, names: set[str]) -> None:
    """config.json's layer count against the layer indices in the tensor names (safetensors headers only), so
    a wrong count fails at once instead of after building a model of that many layers (10,000: over a minute)."""
    prefix, field = _LAYERS.get(config.model_type, _LAYERS_DEFAULT)
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    layer_of = {n: int(m.group(1)) for n in names if (m := pattern.match(n))}
    present = max(layer_of.values()) + 1 if layer_of else 0
    if present == config.num_layers:
        return
    where = f"{path / 'config.json'}: {field}={config.num_layers}"
    if present < config.num_layers:
        held = f"layers 0..{present - 1} only" if present else "no decoder layers"
        raise CheckpointError(f"{where}, but the weights hold {held} (missing tensor {prefix}{present}.*); "
                              "is config.json for this checkpoint?")
    extra = sorted((n for n, i in layer_of.items() if i >= config.num_layers), key=lambda n: (layer_of[n], n))
    more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
    raise CheckpointError(f"{where}, but the weights hold layers up to {present - 1}: unexpected tensors "
                          f"{', '.join(extra[:3])}{more}; is config.json for this checkpoint?")


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", quantize: "str | QuantConfig | None" = None) -> Transformer:
    """Load a local Hugging Face model directory (config.json + safetensors) into our Transformer.
    ``device``: a torch device or a name ``pick_device`` takes (``auto`` included).
    A ``generation_config.json`` there becomes ``model.generation_config`` (a dict): ``generate`` stops at its
    ``eos_token_id`` by default and ``save_model`` writes it back.
    ``quantize``: "int8" | "int4" (or a ``lmforge.models.quant.QuantConfig``): weight-only quantization of the
    decoder's linears for the CPU low-bit kernels (``lmforge.models.quant``). A directory ``lmforge quantize``
    wrote loads quantized without it. "keep" (a .gguf file only): its Q8_0/Q4_0/Q4_1 matrices run on those
    kernels as stored, never made float (``lmforge.models.gguf.load_gguf_model``).
    A LLaVA directory (``model_type: llava``) loads as ``lmforge.models.llava.LlavaForConditionalGeneration``,
    a Llama 3.2 Vision one (``model_type: mllama``) as ``lmforge.models.mllama.MllamaForConditionalGeneration``."""
    device = pick_device(device)
    path = Path(path)
    is_gguf = path.is_file() and path.suffix.lower() == ".gguf"
    if quantize == "keep":
        if not is_gguf:
            raise LmforgeError(f"quantize='keep' keeps a GGUF file's own Q8_0/Q4_0/Q4_1 blocks; {path} is not a .gguf "
                               "file: use quantize='int8' or 'int4'")
        from lmforge.models.gguf import load_gguf_model  # imports this module: loaded on demand

        return load_gguf_model(path, dtype=dtype, device=device, keep=True)
    if quantize is not None:  # an unknown value fails before anything is read
        from lmforge.models.quant import as_config

        quantize = as_config(quantize)
    if is_gguf:
        from lmforge.models.gguf import load_gguf_model  # imports this module: loaded on demand

        return _quantized(load_gguf_model(path, dtype=dtype, device=device), quantize)
    multimodal_type = config_model_type(path)
    if multimodal_type == "llava":  # vision-language: a LlavaForConditionalGeneration
        from lmforge.models.llava import load_llava  # it imports this module

        return load_llava(path, dtype=dtype, device=device, quantize=quantize)
    if multimodal_type == "mllama":  # vision-language with cross-attention: a MllamaForConditionalGeneration
        from lmforge.models.mllama import load_mllama  # it imports this module

        return load_mllama(path, dtype=dtype, device=device, quantize=quantize)
    config = read_config(path)
    generation_config = read_generation_config(path)
    from lmforge.models.quant import load_quantized, read_quantization_config  # it imports this module

    saved_quantization = read_quantization_config(path)
    if saved_quantization is not None:  # written by lmforge quantize: codes packed for the kernels as they load
        return load_quantized(path, config, saved_quantization, dtype, device, requested=quantize,
                              generation_config=generation_config)
    source = _TensorSource(path)
    names = _normalise_names(config, source.names())
    _check_layer_count(path, config, set(names))  # before the model is built: its size comes from the config

    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for tm in weight_map(config):
        if tm.hf not in names:
            raise CheckpointError(f"{path}: missing tensor {tm.hf} (needed for {config.model_type} "
                                  f"with {config.num_layers} layers)")
        used.add(names[tm.hf])
        _place(state, source.get(names[tm.hf]), tm, expected, dtype, device, f"{path}: tensor {tm.hf}")
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        used |= {n for n in ("lm_head.weight",) if n in names}
    unexpected = sorted(n for n in set(names.values()) - used if not _IGNORED.match(n))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: unexpected tensors for {config.model_type}: "
                              f"{', '.join(unexpected[:5])}{more}; is config.json for this checkpoint?")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if generation_config is not None:
        model.generation_config = generation_config
    return _quantized(model.eval(), quantize)


def _quantized(model: Transformer, quantize: "QuantConfig | None") -> Transformer:
    if quantize is None:
        return model
    from lmforge.models.quant import quantize_model

    return quantize_model(model, quantize)


# ---- writing -----------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ConfigError(f"bad shard size {size!r}; use bytes or e.g. '2GB', '500MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our parameters under the HF checkpoint's names and layouts."""
    ours = model.state_dict()
    out = {}
    for tm in weight_map(model.config):
        t = torch.cat([ours[o] for o in tm.ours], dim=0) if len(tm.ours) > 1 else ours[tm.ours[0]]
        if tm.transpose:
            t = t.t()
        out[tm.hf] = t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
    return out


def save_model(model: Transformer, path: str | os.PathLike, max_shard_size: int | str = "2GB",
               dtype: torch.dtype | None = None, tokenizer: object | None = None) -> Path:
    """Write an HF-format directory (config.json + safetensors, sharded past ``max_shard_size``).

    The directory is written beside ``path`` and renamed into place, so ``path`` is always either
    the old or the new complete checkpoint. A quantized model is written by ``lmforge.models.quant.save_quantized``.
    """
    from lmforge.models.quant import quantization_of, save_quantized

    if quantization_of(model) is not None:
        if dtype is not None:
            raise CheckpointError("save_model(dtype=...) cannot convert a quantized model's codes; omit dtype")
        return save_quantized(model, path, tokenizer=tokenizer)
    path = Path(path)
    state = hf_state_dict(model, dtype)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    hf_config = model.config.to_hf()
    saved_dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    hf_config["torch_dtype"] = hf_config["dtype"] = saved_dtype
    with atomic_directory(path) as tmp:
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {}}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                index["weight_map"].update({name: fname for name in shard})
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        gen = getattr(model, "generation_config", None)  # the loaded checkpoint's, kept as it was
        if not isinstance(gen, dict) or not gen:
            gen = {k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if getattr(model.config, k) is not None}
        if gen:
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


__all__ = ["load_model", "save_model", "read_config", "read_generation_config", "weight_map", "hf_state_dict",
           "atomic_file", "config_model_type", "read_model_config", "read_mapped_state"]
