"""GGUF in and out: llama.cpp's single-file format, read and written with the ``gguf`` package (llama.cpp's own).

Reading (``load_gguf_model``, ``read_gguf_tokenizer``) takes the architecture, config, tokenizer and chat template
from the file's metadata and dequantizes every tensor to the requested dtype, so logits match what transformers
computes from the same file with ``from_pretrained(..., gguf_file=...)``. Writing (``save_gguf``, the
``lmforge export-gguf`` command) produces files both llama.cpp's reader and transformers accept.

Conventions this follows, because llama.cpp's ``convert_hf_to_gguf.py`` writes them and transformers undoes them:
  - tensor names come from ``gguf.get_tensor_name_map`` applied to the Hugging Face names;
  - every matrix is stored in ``nn.Linear`` layout ([out, in]), GPT-2's Conv1D weights included;
  - the "llama" architecture (Llama and Mistral) stores the q/k projection rows permuted for llama.cpp's
    interleaved RoPE (``_permute_qk``);
  - Gemma 2 stores its norm weights as ``1 + w`` (the scale actually applied);
  - Mistral is written as architecture "llama" (llama.cpp has no separate one) named "Mistral"; we read a llama
    file whose ``general.name`` contains "mistral" as Mistral (transformers reads it as Llama: the same math). Its
    sliding window goes in ``llama.attention.sliding_window``, which only lmforge reads back.

The tokenizer is rebuilt from ``tokenizer.ggml.*`` with the ``tokenizers`` library (no transformers needed), the
way transformers' GGUF converter builds it, for the two tokenizer models the supported architectures use:
``gpt2`` (byte-level BPE with merges) and ``llama`` (SentencePiece-style BPE with byte fallback; Phi-3 and
Gemma 2 have their own variants). A file that also carries ``tokenizer.huggingface.json`` (we write it) is read
from that exact serialization instead.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.models.checkpoint import weight_map
from lmforge.models.config import Config
from lmforge.models.device import pick_device
from lmforge.models.model import Transformer

# GGUF architecture -> the model_types it can hold. "llama" holds Mistral too (see module docstring).
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "phi3", "gemma2", "gpt2")
_ARCH_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi3": "phi3", "gemma2": "gemma2",
                       "gpt2": "gpt2"}
# Types ``gguf.quants.dequantize`` turns back into floats and that we accept.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
# Block types whose codes map onto lmforge's low-bit kernels as they are (``quantize="keep"``): bytes per block of
# 32 weights, and the ``QuantConfig`` they become (a scale per block; Q4_1's min folded into a zero point).
KEEP_TYPES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
_KEEP_BLOCK = 32
# What ``save_gguf`` writes matrices as (vectors are always F32, as llama.cpp does).
EXPORT_TYPES = ("f32", "f16", "q8_0", "q4_0")

_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:  # a declared dependency, but a broken environment should say what is missing
        raise LmforgeError("reading or writing GGUF files needs the gguf package: pip install 'gguf>=0.16'") from None
    return gguf


# ---- opening a file --------------------------------------------------------------------------------------------
class _File:
    """A parsed GGUF file: metadata values on demand, tensors by name."""

    def __init__(self, path: Path) -> None:
        gguf = _gguf()
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # noqa: BLE001 - the reader raises ValueError/IndexError/struct.error on short files
            raise CheckpointError(f"{path}: cannot read the GGUF file ({type(e).__name__}: {e}); "
                                  "it is truncated or corrupt") from None
        # The reader maps tensors lazily: a file cut inside the last tensor can still parse, so check the end.
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in self.reader.tensors), default=0)
        if end > size:
            raise CheckpointError(f"{path}: the GGUF file is truncated: its tensors need {end} bytes, "
                                  f"the file has {size}")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def need(self, key: str) -> Any:
        if key not in self.reader.fields:
            raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r}")
        return self.get(key)

    @property
    def architecture(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path}: GGUF metadata has no general.architecture")
        return arch


# ---- config from metadata --------------------------------------------------------------------------------------
def _model_type(f: _File) -> str:
    arch = f.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{f.path}: GGUF architecture {arch!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)} (llama includes Mistral)")
    if arch == "llama":
        name = f.get("general.name")
        return "mistral" if isinstance(name, str) and "mistral" in name.lower() else "llama"
    return arch


def read_gguf_config(path: str | os.PathLike) -> Config:
    """The model config a GGUF file's metadata describes."""
    f = _File(Path(path))
    return _config(f)


def _config(f: _File) -> Config:
    model_type = _model_type(f)
    arch = f.architecture
    names = set(f.tensors)

    def key(name: str, default: Any = ...) -> Any:
        full = f"{arch}.{name}"
        if default is ... and not f.has(full):
            raise CheckpointError(f"{f.path}: GGUF metadata has no {full!r} (needed for {arch})")
        value = f.get(full, None if default is ... else default)
        # GGUF stores these as float32: 1e-6 comes back as 9.99999997e-07. Seven significant digits give back
        # the decimal the config held (and what a config.json written from this model would say).
        return float(f"{value:.7g}") if isinstance(value, float) else value

    if key("expert_count", 0):
        raise CheckpointError(f"{f.path}: mixture-of-experts GGUF files ({arch}.expert_count = "
                              f"{key('expert_count')}) are not supported")
    for extra in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
        if extra in names:
            raise CheckpointError(f"{f.path}: RoPE frequency factors ({extra}, Llama 3.1 / Phi-3 long-context "
                                  "scaling) are not supported in GGUF files")
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{f.path}: GGUF file has no token_embd.weight tensor")
    vocab = int(f.tensors["token_embd.weight"].shape[-1])  # ggml order: [hidden, vocab]
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    layers = int(key("block_count"))
    tokenizer_ids = {k: f.get(f"tokenizer.ggml.{g}") for k, g in
                     (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id"))}
    tied = "output.weight" not in names
    if model_type == "gpt2":
        d: dict[str, Any] = {
            "model_type": "gpt2", "vocab_size": vocab, "n_embd": hidden, "n_layer": layers, "n_head": heads,
            "n_inner": int(key("feed_forward_length", 4 * hidden)), "n_positions": int(key("context_length")),
            "layer_norm_epsilon": float(key("attention.layer_norm_epsilon", 1e-5)),
            "activation_function": "gelu_new", "tie_word_embeddings": tied}
    else:
        head_dim = int(key("attention.key_length", hidden // heads))
        rotary = int(key("rope.dimension_count", head_dim))
        d = {"model_type": model_type, "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
             "num_attention_heads": heads, "num_key_value_heads": int(key("attention.head_count_kv", heads)),
             "head_dim": head_dim, "intermediate_size": int(key("feed_forward_length")),
             "max_position_embeddings": int(key("context_length")),
             "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
             "rope_theta": float(key("rope.freq_base", 10000.0)), "partial_rotary_factor": rotary / head_dim,
             "tie_word_embeddings": tied, "hidden_act": "silu"}
        scaling = key("rope.scaling.type", "none")
        if scaling == "linear":
            d["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        elif scaling != "none":
            raise CheckpointError(f"{f.path}: RoPE scaling type {scaling!r} ({arch}.rope.scaling.type) is not "
                                  "supported in GGUF files; supported: none, linear")
        if model_type == "llama":
            d["attention_bias"] = "blk.0.attn_q.bias" in names
            d["mlp_bias"] = "blk.0.ffn_up.bias" in names
        if model_type in ("mistral", "phi3"):  # llama.cpp applies the window for these only when it is stated
            d["sliding_window"] = key("attention.sliding_window", None)
        if model_type == "gemma2":
            # llama.cpp's Gemma 2 defaults, which transformers' GGUF loader gets from Gemma2Config too.
            scale = f.get(f"{arch}.attention.scale")  # kept as 1/sqrt(query_pre_attn_scalar): round that instead
            d.update(hidden_activation="gelu_pytorch_tanh", sliding_window=int(key("attention.sliding_window")),
                     attn_logit_softcapping=float(key("attn_logit_softcapping", 50.0)),
                     final_logit_softcapping=float(key("final_logit_softcapping", 30.0)),
                     query_pre_attn_scalar=float(head_dim if scale is None else f"{scale ** -2:.6g}"),
                     tie_word_embeddings=True)
    d.update({k: int(v) for k, v in tokenizer_ids.items() if v is not None and 0 <= int(v) < vocab})
    try:
        return Config.from_hf(d)
    except ConfigError as e:
        raise ConfigError(f"{f.path}: {e}") from None


# ---- tensor names and layouts ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _GgufTensor:
    gguf: str
    ours: tuple[str, ...]  # concatenated along dim 0 in the file when several
    permute_heads: int | None = None  # llama q/k: rows permuted for interleaved RoPE, over this many heads
    plus_one: bool = False  # Gemma norms: the file holds 1 + w


def _tensor_map(config: Config) -> list[_GgufTensor]:
    gguf = _gguf()
    arch = _ARCH_OF_MODEL_TYPE.get(config.model_type)
    if arch is None or config.num_experts or config.layer_num_heads:
        raise ConfigError(f"{config.model_type} models cannot be written to or read from GGUF here; supported: "
                          f"{', '.join(_ARCH_OF_MODEL_TYPE)}")
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_layers)
    out = []
    for tm in weight_map(config):
        base, suffix = tm.hf.rsplit(".", 1)
        name = names.get_name(base)
        if name is None:  # a name llama.cpp's map lacks would be a bug in this table, not bad input
            raise RuntimeError(f"no GGUF name for {tm.hf} ({arch})")
        permute = None
        if arch == "llama" and name.endswith(".attn_q"):
            permute = config.num_heads
        elif arch == "llama" and name.endswith(".attn_k"):
            permute = config.num_kv_heads
        plus_one = config.model_type == "gemma2" and "norm" in name and suffix == "weight"
        out.append(_GgufTensor(f"{name}.{suffix}", tm.ours, permute, plus_one))
    return out


def _permute_qk(w: torch.Tensor, heads: int, reverse: bool) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` (HF's rotate-half row order -> interleaved pairs), or its inverse."""
    half = w.shape[0] // heads // 2
    if reverse:
        return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- reading the model -----------------------------------------------------------------------------------------
def _dequantize(f: _File, name: str) -> torch.Tensor:
    gguf = _gguf()
    t = f.tensors[name]
    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"{f.path}: tensor {name} is stored as {kind}, a GGUF type not supported here; "
                              f"supported: {', '.join(SUPPORTED_TYPES)}")
    try:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:  # noqa: BLE001 - a short or malformed data block surfaces as a numpy error
        raise CheckpointError(f"{f.path}: cannot read tensor {name} ({type(e).__name__}: {e}); the file may be "
                              "truncated or corrupt") from None
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists the fastest-moving dimension first
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
    if not values.flags.writeable:  # F32 tensors come straight from the read-only memory map
        values = values.copy()
    return torch.from_numpy(values)


def _kept_blocks(f: _File, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A Q8_0/Q4_0/Q4_1 matrix's own codes and block constants, no float weight made: (signed codes int8 [out, in],
    scales float32 [out, in / 32], zeros float32 [out, in / 32] or None), with ``w = code * scale (+ zero)``.
    ggml's blocks: Q8_0 = f16 d, 32 int8 q (w = d q); Q4_0 = f16 d, 16 bytes holding q in [0, 15], elements 0-15 in
    the low nibbles and 16-31 in the high ones (w = d (q - 8)); Q4_1 = f16 d, f16 m, the same nibbles (w = d q + m,
    i.e. code q - 8 with zero m + 8 d)."""
    t = f.tensors[name]
    kind = t.tensor_type.name
    out, k = (int(n) for n in reversed(t.shape.tolist()))
    if k % _KEEP_BLOCK:
        raise CheckpointError(f"{f.path}: tensor {name} ({kind}) has rows of {k}, not a multiple of {_KEEP_BLOCK}")
    raw = np.asarray(t.data, dtype=np.uint8).reshape(-1)
    blocks = out * k // _KEEP_BLOCK
    if raw.size != blocks * KEEP_TYPES[kind]:
        raise CheckpointError(f"{f.path}: tensor {name} holds {raw.size} bytes, {kind} [{out}, {k}] needs "
                              f"{blocks * KEEP_TYPES[kind]}; the file may be truncated or corrupt")
    b = raw.reshape(blocks, KEEP_TYPES[kind])
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    zeros = None
    if kind == "Q8_0":
        codes = b[:, 2:].view(np.int8)
    else:
        qs = b[:, 4:] if kind == "Q4_1" else b[:, 2:]
        codes = np.concatenate((qs & 15, qs >> 4), axis=1).astype(np.int8) - 8
        if kind == "Q4_1":
            zeros = torch.from_numpy(b[:, 2:4].copy().view(np.float16).astype(np.float32) + 8 * d).view(out, -1)
    return (torch.from_numpy(np.ascontiguousarray(codes)).view(out, k), torch.from_numpy(d).view(out, -1), zeros)


def _keep_config(f: _File, config: Config) -> Any:
    """The ``QuantConfig`` a file's decoder matrices keep their blocks as (``quantize="keep"``); one clear error when
    they are not all of one kind that maps onto the kernels. The LM head is kept when it is of that kind too (it
    is often Q6_K in a Q4_0 file), else it loads as float."""
    from lmforge.models.quant import QuantConfig

    names = {gt.gguf for gt in _tensor_map(config) if gt.gguf.startswith("blk.") and gt.gguf.endswith(".weight")
             and f.tensors.get(gt.gguf) is not None and len(f.tensors[gt.gguf].shape) == 2}
    kinds = {f.tensors[n].tensor_type.name for n in names}
    if len(kinds) != 1 or not kinds <= set(KEEP_TYPES):
        counts = {k: sum(f.tensors[n].tensor_type.name == k for n in names) for k in sorted(kinds)}
        held = ", ".join(f"{n} x {k}" for k, n in counts.items())
        raise CheckpointError(f"{f.path}: quantize='keep' keeps matrices whose blocks lmforge's kernels run as they "
                              f"are ({', '.join(KEEP_TYPES)}), all of one kind; this file's layer matrices are {held}. "
                              "Load it with quantize=None (dequantized) or 'int8'/'int4' (re-quantized)")
    kind = kinds.pop()
    head = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
    lm_head = f.tensors[head].tensor_type.name == kind
    if kind == "Q8_0":
        return QuantConfig.make("int8", _KEEP_BLOCK, lm_head=lm_head)
    return QuantConfig.make("int4", _KEEP_BLOCK, symmetric=kind == "Q4_0", lm_head=lm_head)


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", keep: bool = False) -> Transformer:
    """Load a GGUF file into our Transformer, dequantizing every tensor to ``dtype``.

    ``keep``: the decoder's matrices keep their Q8_0/Q4_0/Q4_1 blocks as codes for lmforge's CPU low-bit kernels
    (``lmforge.models.quant``: Q8_0 -> int8 group 32, Q4_0 -> int4 group 32 symmetric, Q4_1 -> int4 group 32 with
    zero points), never made float; embeddings, norms and a head of another type are dequantized. The block
    scales are float16 in the file and bfloat16 in the kernels: each is rounded to the nearest bfloat16 (up to
    2^-9 relative; the codes are exact), so logits differ slightly from the dequantized file's. Q4_1's zero point
    m + 8d is rounded the same way, an error relative to |m + 8d|, not to the step d: small for blocks that
    straddle zero (linear weights), but a block of values far from zero with a narrow range (e.g. all in
    [1.03, 1.045]) can be off by a few steps; load such a file without ``quantize=`` to get its exact values."""
    path = Path(path)
    device = pick_device(device)
    f = _File(path)
    config = _config(f)
    for name, t in f.tensors.items():  # a type we cannot read fails before anything is built
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor {name} is stored as {t.tensor_type.name}, a GGUF type not "
                                  f"supported here; supported: {', '.join(SUPPORTED_TYPES)}")
    quant = None
    if keep:
        from lmforge.models.quant import QuantizedLinear, quantizable_linears

        if device.type != "cpu":
            raise CheckpointError(f"{path}: quantize='keep' runs the file's blocks on the CPU low-bit kernels, not on "
                                  f"{device}: load it with device='cpu', or without quantize= to dequantize")
        quant = _keep_config(f, config)
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    kept_linears = {name for name, _, _ in quantizable_linears(model, quant)} if quant else set()
    kept: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for gt in _tensor_map(config):
        if gt.gguf not in f.tensors:
            raise CheckpointError(f"{path}: missing tensor {gt.gguf} (needed for {config.model_type} with "
                                  f"{config.num_layers} layers)")
        used.add(gt.gguf)
        sizes = [expected[o].shape[0] for o in gt.ours]
        want = (sum(sizes), *expected[gt.ours[0]].shape[1:])
        shape = tuple(int(n) for n in reversed(f.tensors[gt.gguf].shape.tolist()))
        if shape != want:
            raise CheckpointError(f"{path}: tensor {gt.gguf} has shape {list(shape)}, expected {list(want)} "
                                  "from the file's metadata")
        if all(o.removesuffix(".weight") in kept_linears for o in gt.ours):
            parts = _kept_blocks(f, gt.gguf)
            if gt.permute_heads:
                parts = tuple(None if p is None else _permute_qk(p, gt.permute_heads, reverse=True) for p in parts)
            for i, ours in enumerate(gt.ours):
                kept[ours.removesuffix(".weight")] = tuple(  # type: ignore[assignment]
                    None if p is None else p.split(sizes, dim=0)[i].contiguous() for p in parts)
            continue
        tensor = _dequantize(f, gt.gguf)
        if gt.permute_heads:
            tensor = _permute_qk(tensor, gt.permute_heads, reverse=True)
        if gt.plus_one:
            tensor = tensor - 1.0
        for ours, part in zip(gt.ours, tensor.split(sizes, dim=0)):
            state[ours] = part.to(dtype=dtype, device=device).contiguous()
    head_kept = quant is not None and quant.lm_head
    if head_kept and "lm_head" not in kept:  # tied: the embedding's blocks (llama.cpp runs the head on those)
        head = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
        used.add(head)
        kept["lm_head"] = _kept_blocks(f, head)
    # llama.cpp's GPT-2 converter writes output.weight as a copy of the tied embedding: accept it as the head.
    elif config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    unexpected = sorted(set(f.tensors) - used)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: unexpected tensors for {config.model_type}: {', '.join(unexpected[:5])}{more}")
    if quant is not None:
        for name, parent, attr in quantizable_linears(model, quant):
            codes, scales, zeros = kept.pop(name)
            bias = state.pop(f"{name}.bias", None)
            setattr(parent, attr, QuantizedLinear.from_codes(
                codes, scales.to(torch.bfloat16), None if zeros is None else zeros.to(torch.bfloat16), bias, quant))
    model.load_state_dict(state, strict=quant is None, assign=True)
    if config.tie_embeddings and not head_kept:
        model.lm_head.weight = model.model.embed_tokens.weight
    if quant is not None:
        model.quantization = quant
        left = sorted(n for n, t in model.state_dict().items() if t.is_meta)
        if left:  # cannot happen for a file that passed the checks above; never run on uninitialised memory
            raise CheckpointError(f"{path}: no weights for {', '.join(left[:3])}")
    eos = _eos_ids(f)
    if eos:  # generate() stops at the file's end-of-generation ids, as llama.cpp does
        model.generation_config = {"eos_token_id": eos if len(eos) > 1 else eos[0]}
    return model.eval()


def _eos_ids(f: _File) -> list[int]:
    ids = [f.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


# ---- reading the tokenizer -------------------------------------------------------------------------------------
@dataclass
class GGUFTokenizer:
    """What ``load_tokenizer`` needs from a GGUF file to build a ``Tokenizer``."""

    backend: RustTokenizer
    special_tokens: dict[str, str]
    chat_template: str | None
    eos_ids: list[int] = field(default_factory=list)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every token in it)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# Split regexes for llama.cpp's ``tokenizer.ggml.pre`` names (the pre-tokenization its merges were learned with);
# transformers' GGUF converter uses the same table, and the GPT-2 regex for any other name.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best score first
    (transformers' ``generate_merges``, so the two tokenizers agree)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def read_gguf_tokenizer(path: str | os.PathLike) -> GGUFTokenizer:
    """The tokenizer a GGUF file describes: vocabulary, merges, special tokens and chat template."""
    f = _File(Path(path))
    arch = f.architecture
    tokens = f.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{f.path}: GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
    types = list(f.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    kind = f.get("tokenizer.ggml.model")
    ids = {name: f.get(f"tokenizer.ggml.{key}") for name, key in
           (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"))}
    special = {name: tokens[i] for name, i in ids.items() if i is not None and 0 <= i < len(tokens)}
    template = f.get("tokenizer.chat_template")
    hf_json = f.get("tokenizer.huggingface.json")
    if hf_json:  # the exact original serialization (what save_gguf writes): nothing to reconstruct
        try:
            backend = RustTokenizer.from_str(hf_json)
        except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise CheckpointError(f"{f.path}: tokenizer.huggingface.json is not a valid tokenizer ({e})") from None
        return GGUFTokenizer(backend, special, template, _eos_ids(f))

    if kind == "gpt2":
        backend, defaults = _byte_level_bpe(f, tokens, types)
    elif kind == "llama":
        backend, defaults = _sentencepiece_bpe(f, arch, tokens)
    else:
        raise CheckpointError(f"{f.path}: GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; "
                              "supported: gpt2 (byte-level BPE), llama (SentencePiece BPE)")
    # Control tokens are special (matched whole, skipped when decoding); user-defined ones are matched whole.
    # The builder's default special tokens (e.g. <s>, <unk>) count as special when the vocabulary has them, as
    # they do in transformers' tokenizer classes.
    byte_alphabet = set(_bytes_to_unicode().values()) if kind == "gpt2" else None
    control = [t for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL
               and (byte_alphabet is None or set(t) <= byte_alphabet)]
    vocab = backend.get_vocab()
    control += [t for t in defaults if t in vocab and t not in control]
    if control:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says not to; GPT-2 style adds nothing.
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(f.get("tokenizer.ggml.add_eos_token", False))
    single, pair, used = ["$A:0"], ["$A:0", "$B:1"], []
    bos, eos = special.get("bos_token"), special.get("eos_token")
    if add_bos and bos is not None:
        single, pair = [f"{bos}:0", *single], [f"{bos}:0", "$A:0", f"{bos}:1", "$B:1"]
        used.append(bos)
    if add_eos and eos is not None:
        single = [*single, f"{eos}:0"]
        pair = [*pair[:pair.index("$B:1")], f"{eos}:0", *pair[pair.index("$B:1"):], f"{eos}:1"]
        used.append(eos)
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(used)])
    return GGUFTokenizer(backend, special, template, _eos_ids(f))


def _byte_level_bpe(f: _File, tokens: list[str], types: list[int]) -> tuple[RustTokenizer, tuple[str, ...]]:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token outside the byte alphabet (a mislabelled added token) is respelled byte by byte, as transformers does.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in f.get("tokenizer.ggml.merges") or []]
    backend = RustTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(f.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, ("<|endoftext|>",)


def _sentencepiece_bpe(f: _File, arch: str, tokens: list[str]) -> tuple[RustTokenizer, tuple[str, ...]]:
    scores = f.get("tokenizer.ggml.scores")
    if arch == "gemma2":
        # Gemma files spell multi-space tokens with real spaces and their scores do not follow merge order:
        # the position in the file does.
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = [-float(i) for i in range(len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    file_merges = f.get("tokenizer.ggml.merges")
    if file_merges:
        merges = [tuple(m.split(" ")) for m in file_merges]
    else:
        if scores is None or len(scores) != len(tokens):
            raise CheckpointError(f"{f.path}: a SentencePiece GGUF tokenizer needs tokenizer.ggml.scores (one per "
                                  "token) or tokenizer.ggml.merges")
        merges = _generate_merges(vocab, dict(zip(tokens, (float(s) for s in scores))))
    strip_first = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if arch == "gemma2":
        backend = RustTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None,
                                    byte_fallback=True))
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        backend.decoder = decoders.Sequence(strip_first)
        return backend, ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
    backend = RustTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    if arch == "phi3":  # Phi-3 prepends the space in a normalizer (it shows on text that starts with spaces)
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([*strip_first, decoders.Strip(content=" ", left=1)])
    return backend, ("<unk>", "<s>", "</s>")


# ---- writing ---------------------------------------------------------------------------------------------------
def _tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """GGUF tokenizer fields for a ``Tokenizer`` (duck-typed: ``backend``, ``special_tokens``, ``chat_template``)."""
    backend: RustTokenizer = tokenizer.backend
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    vocab = backend.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise LmforgeError(f"the tokenizer has {n} tokens but the model's vocabulary is {vocab_size}; they must match")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids the tokenizer never produces: llama.cpp's padding
    types = [_TOKEN_UNUSED] * vocab_size
    for t, i in vocab.items():
        tokens[i], types[i] = t, _TOKEN_NORMAL
    for i, added in backend.get_added_tokens_decoder().items():
        types[i] = _TOKEN_CONTROL if added.special else _TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = json.dumps(spec.get("pre_tokenizer"))
    out: dict[str, Any] = {"tokens": tokens, "types": types, "merges": merges, "json": backend.to_str()}
    if model.get("type") != "BPE":
        raise LmforgeError(f"a {model.get('type')} tokenizer cannot be written to GGUF; supported: byte-level BPE "
                           "(GGUF 'gpt2') and SentencePiece-style BPE with byte fallback (GGUF 'llama')")
    if "ByteLevel" in pre:
        out["model"] = "gpt2"
        out["pre"] = _pre_name(spec.get("pre_tokenizer"))
    elif model.get("byte_fallback"):
        out["model"] = "llama"
        out["scores"] = [-float(i) for i in range(vocab_size)]  # rank order; the merges are written too
        for i, t in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", t):
                types[i] = _TOKEN_BYTE
    else:
        raise LmforgeError("this BPE tokenizer is neither byte-level nor byte-fallback, so GGUF cannot describe it")
    unk = model.get("unk_token")
    if unk in vocab and types[vocab[unk]] == _TOKEN_NORMAL:
        types[vocab[unk]] = _TOKEN_UNKNOWN
    ids = {k: vocab.get(v) for k, v in tokenizer.special_tokens.items()}
    out["ids"] = {k: i for k, i in ids.items() if i is not None}
    # Whether encoding adds BOS/EOS: ask the post-processor rather than parse its many forms.
    probe = backend.encode("a", add_special_tokens=True).ids
    bare = backend.encode("a", add_special_tokens=False).ids
    out["add_bos"] = len(probe) > len(bare) and probe[0] == ids.get("bos_token")
    out["add_eos"] = len(probe) > len(bare) and probe[-1] == ids.get("eos_token")
    out["chat_template"] = tokenizer.chat_template
    out["eos_ids"] = [i for i in getattr(tokenizer, "eos_ids", []) if i != ids.get("eos_token")]
    return out


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's name for this byte-level pre-tokenizer, or "default" when it has none (then llama.cpp and
    transformers split text with their defaults; lmforge reads the exact tokenizer back from the JSON copy)."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel":
            regex = (parts[0].get("pattern") or {}).get("Regex")
            for name in ("llama-bpe", "qwen2", "tekken", "gpt-4o"):
                if PRE_TOKENIZER_SPLITS[name] == regex:
                    return name
    return "default"


def _quantize(w: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    """Encode one matrix as ``kind``; (array, raw GGML type or None for a plain float array)."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if kind == "f32" or w.ndim < 2:
        return w.astype(np.float32), None
    if kind == "f16":
        return w.astype(np.float16), None
    qtype = {"q8_0": q.Q8_0, "q4_0": q.Q4_0}[kind]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:  # llama.cpp's converter falls back to F16 for rows that do not fill whole blocks
        return w.astype(np.float16), None
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def save_gguf(model: Transformer, path: str | os.PathLike, qtype: str = "f16", tokenizer: Any = None,
              name: str | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``, an lmforge ``Tokenizer``) as a GGUF file llama.cpp and transformers read.

    ``qtype``: how matrices are stored: f32, f16, q8_0 or q4_0 (norms and biases stay F32)."""
    gguf = _gguf()
    path = Path(path)
    c = model.config
    if qtype not in EXPORT_TYPES:
        raise LmforgeError(f"GGUF type {qtype!r} cannot be written; choose one of {', '.join(EXPORT_TYPES)}")
    arch = _ARCH_OF_MODEL_TYPE.get(c.model_type)
    if arch is None:
        raise LmforgeError(f"{c.model_type} models cannot be exported to GGUF; supported: "
                           f"{', '.join(_ARCH_OF_MODEL_TYPE)}")
    rope_type = (c.rope_scaling or {}).get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise LmforgeError(f"RoPE scaling {rope_type!r} cannot be exported to GGUF yet; supported: none, linear")
    if c.model_type == "gemma2" and c.layer_types and c.layer_types != [
            "sliding" if i % 2 == 0 else "full" for i in range(c.num_layers)]:
        raise LmforgeError("GGUF Gemma 2 alternates sliding (even) and full (odd) layers; this model does not")

    state = model.state_dict()
    tensors: list[tuple[str, np.ndarray, Any]] = []
    for gt in _tensor_map(c):
        t = torch.cat([state[o] for o in gt.ours], dim=0) if len(gt.ours) > 1 else state[gt.ours[0]]
        t = t.detach().to(device="cpu", dtype=torch.float32)
        if gt.permute_heads:
            t = _permute_qk(t, gt.permute_heads, reverse=False)
        if gt.plus_one:
            t = t + 1.0
        array, raw = _quantize(t.contiguous().numpy(), qtype)
        tensors.append((gt.gguf, array, raw))
    if c.model_type == "gpt2" and c.tie_embeddings:
        # llama.cpp's GPT-2 graph reads output.weight; its converter writes the tied head out as a copy.
        emb = next(a for n, a, _ in tensors if n == "token_embd.weight")
        tensors.append(("output.weight", emb, next(r for n, _, r in tensors if n == "token_embd.weight")))

    # Written beside the target and renamed into place, so a failed export never leaves a partial file there.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        w = gguf.GGUFWriter(tmp, arch)
        # "Mistral" (any case) in the name is how a llama-architecture file says Mistral; transformers takes only
        # the exact name "mistral" that way and then fails (gguf has no "mistral" tensor map), so never write that.
        w.add_name(name or c.model_type.capitalize())
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_block_count(c.num_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_heads)
        w.add_vocab_size(c.vocab_size)
        if c.model_type == "gpt2":
            w.add_layer_norm_eps(c.norm_eps)
        else:
            w.add_head_count_kv(c.num_kv_heads)
            w.add_layer_norm_rms_eps(c.norm_eps)
            w.add_rope_freq_base(c.rope_theta)
            w.add_rope_dimension_count(c.rotary_dim)
            if c.head_dim != c.hidden_size // c.num_heads or c.model_type == "gemma2":
                w.add_key_length(c.head_dim)
                w.add_value_length(c.head_dim)
            if rope_type == "linear":
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
            if c.sliding_window is not None and c.model_type in ("mistral", "phi3", "gemma2"):
                w.add_sliding_window(c.sliding_window)
        if c.model_type == "gemma2":
            if c.attn_logit_softcap is not None:
                w.add_attn_logit_softcapping(c.attn_logit_softcap)
            if c.final_logit_softcap is not None:
                w.add_final_logit_softcapping(c.final_logit_softcap)
            scale = c.attention_scale or c.head_dim ** -0.5
            if not math.isclose(scale, c.head_dim ** -0.5, rel_tol=1e-6):
                w.add_attention_scale(scale)
        if tokenizer is not None:
            meta = _tokenizer_metadata(tokenizer, c.vocab_size)
            w.add_tokenizer_model(meta["model"])
            if "pre" in meta:
                w.add_tokenizer_pre(meta["pre"])
            w.add_token_list(meta["tokens"])
            w.add_token_types(meta["types"])
            if "scores" in meta:
                w.add_token_scores(meta["scores"])
            if meta["merges"]:
                w.add_token_merges(meta["merges"])
            adders = {"bos_token": w.add_bos_token_id, "eos_token": w.add_eos_token_id,
                      "unk_token": w.add_unk_token_id, "pad_token": w.add_pad_token_id}
            for key, token_id in meta["ids"].items():
                if key in adders:
                    adders[key](token_id)
            if meta["eos_ids"]:  # e.g. <|im_end|>: llama.cpp stops at the end-of-turn token too
                w.add_eot_token_id(meta["eos_ids"][0])
            w.add_add_bos_token(meta["add_bos"])
            w.add_add_eos_token(meta["add_eos"])
            if meta["chat_template"]:
                w.add_chat_template(meta["chat_template"])
            w.add_string(_gguf().Keys.Tokenizer.HF_JSON, meta["json"])
        else:  # no vocabulary, but the config's special ids still tell readers (transformers) what they are
            for value, add in ((c.bos_token_id, w.add_bos_token_id), (c.eos_token_id, w.add_eos_token_id),
                               (c.pad_token_id, w.add_pad_token_id)):
                value = value[0] if isinstance(value, list) and value else value
                if isinstance(value, int):
                    add(value)
        for tname, array, raw in tensors:
            w.add_tensor(tname, array, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


__all__ = [
    "EXPORT_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TYPES",
    "GGUFTokenizer",
    "load_gguf_model",
    "read_gguf_config",
    "read_gguf_tokenizer",
    "save_gguf",
]


# ---- lmforge export-gguf -----------------------------------------------------------------------------------------
def _directory_tokenizer(path: Path) -> Any:
    """The tokenizer parts of a model directory that the exporter writes (read here, not via lmforge.data's
    ``load_tokenizer``: models sits below data, so it names the few fields it needs itself)."""
    from types import SimpleNamespace

    from lmforge.io import read_json_object

    file = path / "tokenizer.json"
    if not file.is_file():
        raise LmforgeError(f"{path} has no tokenizer.json; a GGUF file carries its tokenizer, so export needs one")
    try:
        backend = RustTokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
        raise LmforgeError(f"{file}: not a valid tokenizer file ({e})") from None
    config = read_json_object(path / "tokenizer_config.json", LmforgeError) \
        if (path / "tokenizer_config.json").is_file() else {}
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    template = config.get("chat_template")
    if isinstance(template, list):  # the older named-templates form
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if (path / "chat_template.jinja").is_file():  # transformers gives the standalone file priority
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    gen = read_json_object(path / "generation_config.json", LmforgeError) \
        if (path / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    return SimpleNamespace(backend=backend, special_tokens=special, chat_template=template
                           if isinstance(template, str) else None, eos_ids=eos_ids)


def _export_args(p: Any) -> None:
    p.add_argument("path", help="a Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="f16", choices=EXPORT_TYPES,
                   help="how matrices are stored (norms and biases stay f32); default f16")
    p.add_argument("--name", default=None, help="general.name in the file (default: the architecture)")


def _register() -> None:
    from lmforge.commands import command

    @command("export-gguf", "write a model directory as one GGUF file (llama.cpp; transformers gguf_file=)")(
        _export_args)
    def export_gguf_cmd(args: Any) -> int:
        from lmforge.models.checkpoint import load_model

        src = Path(args.path)
        if not str(args.out).lower().endswith(".gguf"):
            raise LmforgeError(f"--out {args.out} must name a .gguf file")
        tokenizer = _directory_tokenizer(src) if src.is_dir() else None
        model = load_model(src)  # float32: quantizing from full precision
        out = save_gguf(model, args.out, args.type, tokenizer=tokenizer, name=args.name)
        arch = _ARCH_OF_MODEL_TYPE[model.config.model_type]
        print(f"wrote {out}: {model.config.model_type} as GGUF architecture {arch}, "
              f"matrices {args.type}, {out.stat().st_size / 2**20:.1f} MiB")
        return 0


_register()
