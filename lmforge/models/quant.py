"""Weight-only quantization of the decoder's linear layers: int8 per output channel, int4 in groups.

Batch-1 decoding on a CPU reads every weight once per token, so fewer bytes per weight is the way to a faster
token. ``quantize_model`` replaces each ``nn.Linear`` of the decoder (q/k/v/o, gate/up/down, every expert's MLP
in a MoE, and the LM head unless ``lm_head=False``) with a ``QuantizedLinear`` that keeps only low-bit codes
packed for one of PyTorch's CPU weight-packed matmul kernels and calls that kernel in ``forward``; no float
copy of the weight exists at run time. MoE routers stay float (tiny, and routing is precision-sensitive);
so do embeddings, norms and biases.

Formats (``w`` the float weight, ``q`` the integer code, ``s`` the scale, ``z`` the zero):
  - ``int8``: symmetric, one scale per output row (the default) or per group of ``group_size`` inputs (llama.cpp's
    Q8_0 is group 32; what a GGUF file's Q8_0 blocks load as with ``quantize="keep"``): ``w = q * s``,
    q in [-127, 127], s = max|w| / 127.
  - ``int4``: groups of ``group_size`` (32, 64, 128 or 256) consecutive inputs of a row, q in [-8, 7]. Symmetric
    (llama.cpp Q4_0's rule): ``w = q * s`` with s = m / -8 for the group's largest-magnitude value m, so m is
    exactly representable; with zero points (Q4_1-like, the default): ``w = q * s + z``, s = (max - min) / 15,
    z = min + 8 s. A row whose width is not a multiple of the group ends in a partial group (zero-padded).
Scales and zeros are bfloat16, as the kernels take them: each scale is rounded up to a bfloat16 value before
the codes are chosen (so no code overflows), each zero to the nearest one, so what is stored is exactly what
the kernel multiplies by.

Kernels, chosen by measurement (``python benchmarks/quant_speed.py --kernels``: one decode step's
matrix-vector products, every layer plus the LM head, batch 1, 2 threads, min of 11 interleaved reps; torch 2.13,
AVX-512, on a 2-core machine shared with other jobs (load average 2.6-4.1), so medians were 1.5-5x the minima;
ms per sweep):

    shape (weights)                     fp32   bf16   int8pack  int8 as 2 x int4   int4 g32  g64   g128
    12 layers x 768 + head (100.1M)     84.9  126.9     27.4          24.7           14.7   13.0   13.4
    30 layers x 576 + head (134.5M)     95.6  228.7     48.0          38.1           24.6   24.1   34.1

  An earlier run (9 reps) gave the same order: 30 x 576: fp32 83.2, int8pack 25.5, 2 x int4 18.6, int4 g32 11.1.
  Per row of a batch (same kernels, 4 layers of 30 x 576, 15 reps): at 1 row int8pack 1.81-1.91 ms vs
  2 x int4 1.67-1.70 ms; at 256 rows (prefill) 0.78 vs 1.24 ms per row, fp32 0.65, int4 g32 0.44: int8 prefill
  is slower than float32 on either kernel, int4 prefill faster.
  - int4: ``aten._weight_int4pack_mm_for_cpu`` (bf16 activations; it also takes float32 activations, but
    that path is 40-80x slower: 918 ms for the 30 x 576 sweep). torchao 0.18 (installs against torch 2.13
    unchanged) ships no CPU kernels in its wheel: its CPU int4 weight-only layout calls this same op, its int8
    weight-only path is dequantize-then-``mm`` for Inductor to fuse, and its ``da8w4`` CPU kernel is not
    built, so it adds nothing here.
  - int8: the same int4 kernel, each int8 code split exactly into a high and a low nibble (``q = 16 h + l``,
    h in [-8, 7], l in [0, 15]) laid side by side as one int4 matrix of twice the width, multiplied by the
    activation concatenated with itself: the same bytes per weight as int8 and faster than
    ``aten._weight_int8pack_mm`` (int8pack; bf16 activations; with float32 activations it takes 154 ms).
    ``kernel="int8pack"`` selects the latter.

Precision: the kernels take bfloat16 activations and return bfloat16. ``QuantizedLinear`` rounds its input to
bfloat16 and casts the output back to the input's dtype, so a model loaded in float32 keeps float32
everywhere else (embeddings, norms, attention, the KV cache, the residual stream); loaded in bfloat16 it runs
in bfloat16 throughout with no casts. Kernels run on the CPU only.

Training (QLoRA, ``lmforge.train.lora``): the quantized weights are frozen buffers, never parameters, so nothing
in a quantized layer trains; adapters train around them. Gradients flow through a quantized layer to its input:
neither kernel has a derivative (torch 2.13: ``derivative for aten::_weight_int4pack_mm_for_cpu is not
implemented``, likewise ``_weight_int8pack_mm``), so ``QuantizedLinear.matmul`` is a custom autograd function
whose backward multiplies the output gradient by the weight dequantized on the fly, in float32 tiles of rows
(at most ``_DEQUANT_TILE_ELEMENTS`` floats at a time), so no float copy of a weight outlives the backward of
its layer. The input's rounding to bfloat16 is passed straight through (its derivative is taken as 1).
``dequantize_model`` turns a quantized model back into a float one (what a merged QLoRA model is saved as).

On disk (``save_quantized``; ``save_model`` delegates here): config.json with a ``quantization_config``
``{"quant_method": "lmforge", "format", "group_size", "symmetric", "lm_head"}``, and safetensors under
lmforge's own parameter names (for Llama-family models these are the Hugging Face names), in a portable layout
independent of the kernel's packing: for each quantized linear ``<name>.qweight`` (int8 [out, in] codes for
int8; uint8 [out, ceil(in / 2)] for int4, code + 8 in the low nibble for even inputs and the high nibble for
odd ones), ``<name>.scales`` (bf16 [out, groups], groups = 1 for int8), ``<name>.zeros`` (bf16 [out, groups],
int4 with zero points only) and ``<name>.bias`` when it has one; everything else as float tensors.
``load_model`` recognises the config and packs the codes for the kernel as it loads.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import CheckpointError, LmforgeError

FORMATS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
DEFAULT_INT4_GROUP_SIZE = 32
QUANT_METHOD = "lmforge"
# Kernel names: "int4pack" (int4 formats), "int4x2" (int8 as two nibbles through the int4 kernel), "int8pack".
INT8_KERNELS = ("int4x2", "int8pack")
DEFAULT_INT8_KERNEL = "int4x2"  # faster by measurement (module docstring)

_PACK_ROWS = 64  # the int4 CPU packing interleaves rows in blocks of 64 (a shorter tail block is laid out
# differently), so output rows are zero-padded to a multiple of 64; every common width already is one
_TINY = 2.0 ** -100  # the scale of an all-zero row or group: codes 0, dequantized exactly to 0
# The backward dequantizes a weight in tiles of whole 64-row blocks of about this many float32 values (16 MiB), so
# a large layer (the LM head) never needs a float copy of its whole weight at once.
_DEQUANT_TILE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class QuantConfig:
    """How a model's linears are quantized; ``group_size`` is None for int8 (one scale per output row)."""

    format: str
    group_size: int | None = None
    symmetric: bool = True
    lm_head: bool = True

    @classmethod
    def make(cls, format: str, group_size: int | None = None, symmetric: bool | None = None,  # noqa: A002
             lm_head: bool = True) -> "QuantConfig":
        """A validated config; defaults: int8 symmetric, int4 group 32 with zero points."""
        fmt = check_format(format)
        if group_size is not None and group_size not in INT4_GROUP_SIZES:
            raise LmforgeError(f"{fmt} group size {group_size} is not supported; use one of "
                               f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        if fmt == "int8":
            if symmetric is False:
                raise LmforgeError("int8 is symmetric (one scale per output channel or group); zero points are for "
                                   "int4")
            return cls("int8", None if group_size is None else int(group_size), True, bool(lm_head))
        group_size = DEFAULT_INT4_GROUP_SIZE if group_size is None else group_size
        return cls("int4", int(group_size), False if symmetric is None else bool(symmetric), bool(lm_head))

    def to_json(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format": self.format, "group_size": self.group_size,
                "symmetric": self.symmetric, "lm_head": self.lm_head}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> "QuantConfig":
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: quantization_config must be an object, got {type(raw).__name__}")
        method = raw.get("quant_method")
        if method != QUANT_METHOD:
            raise CheckpointError(f"{where}: quantization_config.quant_method is {method!r}; lmforge loads only its "
                                  f"own ({QUANT_METHOD!r}, written by `lmforge quantize`), not other libraries' "
                                  "quantized checkpoints: load the float checkpoint and pass quantize= instead")
        try:
            return cls.make(raw.get("format"), raw.get("group_size"), raw.get("symmetric"), raw.get("lm_head", True))
        except LmforgeError as e:
            raise CheckpointError(f"{where}: quantization_config: {e}") from None

    def describe(self) -> str:
        if self.format == "int8":
            what = "int8 per output channel" if self.group_size is None else f"int8 group {self.group_size}"
        else:
            what = f"int4 group {self.group_size} {'symmetric' if self.symmetric else 'with zero points'}"
        return what + ("" if self.lm_head else ", LM head float")


def check_format(value: Any) -> str:
    """``value`` if it names a format, else one ``LmforgeError`` listing the valid ones."""
    if isinstance(value, str) and value in FORMATS:
        return value
    raise LmforgeError(f"quantize={value!r} is not a quantization format; use one of "
                       f"{', '.join(map(repr, FORMATS))} (or None for float weights; 'keep' for a GGUF file's own "
                       "blocks)")


def as_config(quantize: "str | QuantConfig") -> QuantConfig:
    """``load_model``'s ``quantize=``: a format name (its defaults) or a ``QuantConfig``."""
    return quantize if isinstance(quantize, QuantConfig) else QuantConfig.make(check_format(quantize))


# ---- quantization arithmetic (pure functions on float weights) ---------------------------------------------
def _bf16_ceil(x: Tensor) -> Tensor:
    """``x`` (float32, >= 0) rounded up to a bfloat16 value, so |w| / scale never exceeds the code range."""
    b = x.to(torch.bfloat16)
    low = b.float() < x
    return torch.where(low, torch.nextafter(b, torch.full_like(b, math.inf)), b)


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """[out, in] float32 -> [out, groups, group_size], the last group zero-padded."""
    out, k = w.shape
    pad = -k % group_size
    return F.pad(w.float(), (0, pad)).view(out, (k + pad) // group_size, group_size)


def quantize_int8(w: Tensor, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(codes int8 [out, in] in [-127, 127], scales bf16 [out, groups]) with ``w ~= codes * scales``; one group
    per row when ``group_size`` is None (llama.cpp's Q8_0 is ``group_size=32``)."""
    out, k = w.shape
    g = _grouped(w, group_size or k)
    absmax = g.abs().amax(dim=-1, keepdim=True)
    scale = _bf16_ceil(torch.where(absmax > 0, absmax / 127, torch.full_like(absmax, _TINY)))
    codes = torch.round(g / scale.float()).clamp_(-127, 127).view(out, -1)[:, :k].to(torch.int8)
    return codes, scale.squeeze(-1)


def quantize_int4(w: Tensor, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(codes int8 [out, in] in [-8, 7], scales bf16 [out, groups], zeros bf16 [out, groups] or None)."""
    out, k = w.shape
    g = _grouped(w, group_size)
    if symmetric:
        # Q4_0: s = m / -8 for the largest-magnitude m, so m maps to code -8 exactly and the grid is 1/8 of |m|.
        idx = g.abs().argmax(dim=-1, keepdim=True)
        m = g.gather(-1, idx)
        mag = _bf16_ceil(torch.where(m != 0, m.abs() / 8, torch.full_like(m, _TINY)))
        scale = torch.where(m > 0, -mag.float(), mag.float()).to(torch.bfloat16)
        codes = torch.round(g / scale.float()).clamp_(-8, 7)
        zeros = None
    else:
        lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        # A floor relative to the magnitude keeps z's bfloat16 rounding small next to the step (it never binds
        # for a group that straddles zero); an all-zero group gets the tiny scale and dequantizes to 0.
        step = torch.maximum((hi - lo) / 15, torch.maximum(hi.abs(), lo.abs()) / 128)
        scale = _bf16_ceil(torch.where(step > 0, step, torch.full_like(step, _TINY)))
        zeros = (lo + 8 * scale.float()).to(torch.bfloat16)
        codes = torch.round((g - zeros.float()) / scale.float()).clamp_(-8, 7)
        zeros = zeros.squeeze(-1)
    codes = codes.view(out, -1)[:, :k].to(torch.int8)
    return codes, scale.squeeze(-1), zeros


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor | None = None, group_size: int | None = None) -> Tensor:
    """float32 [out, in] from codes [out, in] and per-group scales/zeros [out, groups]; ``group_size`` None:
    one scale per row (int8)."""
    out, k = codes.shape
    group_size = group_size or k
    if scales.shape != (out, -(-k // group_size)):
        raise LmforgeError(f"dequantize: scales of shape {list(scales.shape)} do not fit codes {list(codes.shape)} "
                           f"in groups of {group_size}")
    g = _grouped(codes.float(), group_size) * scales.float()[:, :, None]
    if zeros is not None:
        g = g + zeros.float()[:, :, None]
    return g.view(out, -1)[:, :k]


# ---- packing for the CPU kernels --------------------------------------------------------------------------
def _pack_int4(unsigned: Tensor) -> Tensor:
    """uint codes [N, K] in [0, 15] (N % 64 == 0, K even) -> the int4 CPU kernel's packed uint8 [N, K / 2]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.to(torch.int32).contiguous(), 1)


def _unpack_int4(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of ``_pack_int4`` for N % 64 == 0: blocks of 64 rows, stored [K, 32] per block, byte = row r
    (low nibble) | row r + 32 (high nibble). The caller checks the result by packing it again."""
    blocks = packed.reshape(n // _PACK_ROWS, k, _PACK_ROWS // 2).to(torch.int32)
    rows = torch.cat((blocks & 15, blocks >> 4), dim=2)  # [blocks, K, 64]
    return rows.permute(0, 2, 1).reshape(n, k)


@functools.cache
def _check_int4_layout(width: int) -> None:
    """``_unpack_int4`` inverts this torch's int4 CPU packing at this width (checked once per width and process,
    on random codes), so codes read back from a packed weight are the ones that were packed."""
    codes = torch.randint(0, 16, (2 * _PACK_ROWS, width), generator=torch.Generator().manual_seed(0),
                          dtype=torch.int32)
    if not torch.equal(_unpack_int4(_pack_int4(codes), *codes.shape), codes):
        raise LmforgeError("internal error: this torch's int4 CPU packing differs from the layout lmforge "
                           "unpacks; cannot read the codes back (please report, with the torch version)")


def _pick_kernel(config: QuantConfig, kernel: str | None) -> str:
    """``kernel`` (default: the format's) if it runs ``config``'s format, else one ``LmforgeError``."""
    if config.format == "int4":
        if kernel not in (None, "int4pack"):
            raise LmforgeError(f"kernel {kernel!r} is not an int4 kernel; int4 runs on 'int4pack'")
        return "int4pack"
    kernel = kernel or DEFAULT_INT8_KERNEL
    if kernel not in INT8_KERNELS:
        raise LmforgeError(f"kernel {kernel!r} is not an int8 kernel; use one of {', '.join(INT8_KERNELS)}")
    if kernel == "int8pack" and config.group_size is not None:
        raise LmforgeError(f"the int8pack kernel has one scale per output channel; {config.describe()} runs on "
                           "'int4x2'")
    return kernel


def _nibbles(codes4: Tensor) -> Tensor:
    """Portable int4 storage: codes [out, in] in [-8, 7] -> uint8 [out, ceil(in / 2)], even input low."""
    u = (codes4.to(torch.int16) + 8)
    if u.shape[1] % 2:
        u = F.pad(u, (0, 1), value=8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)


def _from_nibbles(packed: Tensor, k: int) -> Tensor:
    u = packed.to(torch.int16)
    return torch.stack((u & 15, u >> 4), dim=2).reshape(packed.shape[0], -1)[:, :k].sub(8).to(torch.int8)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _largest_group(k: int) -> int:
    return next((g for g in sorted(INT4_GROUP_SIZES, reverse=True) if k % g == 0), min(INT4_GROUP_SIZES))


class _QuantizedMatmul(torch.autograd.Function):
    """``x W^T`` through a low-bit kernel, differentiable with respect to ``x`` (the kernels have no derivative)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: "QuantizedLinear") -> Tensor:
        ctx.layer = layer
        return layer._kernel_matmul(x)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        layer = ctx.layer
        grad_in = layer.input_grad(grad_out.reshape(-1, layer.out_features))
        return grad_in.reshape(*grad_out.shape[:-1], layer.in_features).to(grad_out.dtype), None


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with W held as int8 or int4 codes packed for a CPU low-bit matmul kernel.

    Build it with ``from_linear`` (quantizes a float ``nn.Linear``) or ``from_codes`` (codes already chosen,
    e.g. read from a checkpoint). ``forward`` takes any leading shape and dtype (see the module docstring
    for the activation precision). ``weight`` dequantizes on demand for code that reads weights (e.g. the
    logit lens); ``portable()`` gives the on-disk tensors.
    """

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, kernel: str) -> None:
        super().__init__()
        self.in_features, self.out_features, self.config, self.kernel = in_features, out_features, config, kernel
        # the kernel's width constraints: zero inputs appended (pad_k) so the width is a multiple of its group
        # (kernel_group, what the int4 kernel is called with), or of 16 for int8pack, whose AVX-512 path reads
        # the width in blocks of 16 and crashes the process on any other width
        if kernel == "int8pack":
            self.kernel_group = 0
            self.pad_k = _round_up(in_features, 16) - in_features
        else:
            self.kernel_group = (config.group_size or _largest_group(in_features)) if kernel == "int4x2" \
                else config.group_size
            self.pad_k = _round_up(in_features, self.kernel_group) - in_features
        self.n_padded = _round_up(out_features, _PACK_ROWS)
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("kernel_scales", torch.empty(0, dtype=torch.bfloat16))
        self.bias: Tensor | None
        self.register_buffer("bias", None)

    # -- construction --
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig, kernel: str | None = None) -> "QuantizedLinear":
        w = linear.weight.detach()
        if config.format == "int8":
            codes, scales = quantize_int8(w, config.group_size)
            zeros = None
        else:
            codes, scales, zeros = quantize_int4(w, config.group_size, config.symmetric)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_codes(codes, scales, zeros, bias, config, kernel)

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
                   config: QuantConfig, kernel: str | None = None) -> "QuantizedLinear":
        """Pack signed ``codes`` [out, in] and bf16 ``scales``/``zeros`` [out, groups] for the kernel."""
        out, k = codes.shape
        self = cls(k, out, config, _pick_kernel(config, kernel))
        kernel, group = self.kernel, self.kernel_group
        n_pad = self.n_padded - out
        scales = scales.to(torch.bfloat16)
        if kernel == "int8pack":
            self.packed = F.pad(codes.to(torch.int8), (0, self.pad_k)).contiguous()
            self.kernel_scales = scales[:, 0].contiguous()
        elif kernel == "int4x2":
            # q = 16 h + l exactly (h = floor(q / 16) in [-8, 7], l in [0, 15]); the int4 kernel computes
            # (u - 8) * s' + z' per group: h as u = h + 8 with s' = 16 s, z' = 0; l as u = l with s' = s, z' = 8 s.
            q = F.pad(codes.to(torch.int32), (0, self.pad_k, 0, n_pad))
            high = torch.div(q, 16, rounding_mode="floor")
            low = q - 16 * high
            self.packed = _pack_int4(torch.cat((high + 8, low), dim=1))
            # per-channel scales [out, 1] repeat over the kernel's groups; grouped ones [out, groups] map one to one
            s = F.pad(scales.float(), (0, 0, 0, n_pad), value=1.0).t()  # padded rows: codes 0, any finite scale
            s = s.expand((k + self.pad_k) // group, -1)
            high_sz = torch.stack((16 * s, torch.zeros_like(s)), dim=-1)
            low_sz = torch.stack((s, 8 * s), dim=-1)
            self.kernel_scales = torch.cat((high_sz, low_sz), dim=0).to(torch.bfloat16).contiguous()
        else:
            u = F.pad(codes.to(torch.int32) + 8, (0, self.pad_k, 0, n_pad), value=8)  # code 0 in the padding
            self.packed = _pack_int4(u)
            s = F.pad(scales.float(), (0, 0, 0, n_pad), value=1.0)
            z = torch.zeros_like(s) if zeros is None else F.pad(zeros.float(), (0, 0, 0, n_pad))
            # the kernel's layout: [groups, N, (scale, zero)], dequantizing (u - 8) * scale + zero
            self.kernel_scales = torch.stack((s.t(), z.t()), dim=-1).to(torch.bfloat16).contiguous()
        if bias is not None:
            self.bias = bias.detach().clone()
        return self

    @classmethod
    def empty(cls, in_features: int, out_features: int, config: QuantConfig, kernel: str | None = None,
              bias: bool = False, device: torch.device | str = "meta") -> "QuantizedLinear":
        """A layer whose buffers have the shapes and dtypes ``from_codes`` gives them, uninitialised (on the meta
        device by default): the structure that ``load_state_dict(..., assign=True)`` fills with a quantized model's
        state dict."""
        self = cls(in_features, out_features, config, _pick_kernel(config, kernel))
        width = in_features + self.pad_k
        if self.kernel == "int8pack":
            self.packed = torch.empty(out_features, width, dtype=torch.int8, device=device)
            self.kernel_scales = torch.empty(out_features, dtype=torch.bfloat16, device=device)
        else:
            nibble_columns = 2 * width if self.kernel == "int4x2" else width  # int4x2: high and low halves
            self.packed = torch.empty(self.n_padded, nibble_columns // 2, dtype=torch.uint8, device=device)
            self.kernel_scales = torch.empty(nibble_columns // self.kernel_group, self.n_padded, 2,
                                             dtype=torch.bfloat16, device=device)
        if bias:
            self.bias = torch.empty(out_features, device=device)
        return self

    # -- running --
    def forward(self, x: Tensor) -> Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias

    def matmul(self, x: Tensor) -> Tensor:
        """``x W^T`` (no bias) in ``x``'s dtype, any leading shape; differentiable with respect to ``x`` (module
        docstring), never with respect to the frozen weight."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuantizedMatmul.apply(x, self)
        return self._kernel_matmul(x)

    def _kernel_matmul(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise LmforgeError(f"quantized layers run on the CPU only (their low-bit kernels are CPU kernels); the "
                               f"input is on {x.device}: keep the model and its inputs on the CPU")
        lead = x.shape[:-1]
        a = x.reshape(-1, self.in_features)
        if a.dtype != torch.bfloat16:  # the kernels' activation dtype (their float32 path is 40-80x slower)
            a = a.to(torch.bfloat16)
        if self.pad_k:
            a = F.pad(a, (0, self.pad_k))
        a = a.contiguous()
        if self.kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(a, self.packed, self.kernel_scales)
        else:
            if self.kernel == "int4x2":
                a = torch.cat((a, a), dim=-1)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.packed, self.kernel_group, self.kernel_scales)
        if self.n_padded != self.out_features and self.kernel != "int8pack":
            y = y[:, :self.out_features]
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def input_grad(self, grad_out: Tensor) -> Tensor:
        """``grad_out @ W`` in float32: the gradient with respect to the input, [M, in], of an output gradient
        [M, out], with W dequantized on the fly in tiles of rows (module docstring)."""
        grad_out = grad_out.float()
        grad_in = grad_out.new_zeros(grad_out.shape[0], self.in_features)
        for rows, weight in self.dequantized_tiles():
            grad_in.addmm_(grad_out[:, rows], weight)
        return grad_in

    # -- reading the weights back --
    def _codes_rows(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(signed codes int8, scales bf16, zeros bf16 or None) of output rows ``start:stop``, read from the
        kernel's packing (views where the packing allows); ``start`` is a multiple of 64, the packing's row block."""
        k = self.in_features
        if self.kernel == "int8pack":
            return self.packed[start:stop, :k], self.kernel_scales[start:stop, None], None
        if start % _PACK_ROWS:
            raise LmforgeError(f"internal error: rows of a packed int4 weight are read from a multiple of "
                               f"{_PACK_ROWS}, not from {start}")
        width = self.packed.shape[1] * 2
        _check_int4_layout(width)
        end = _round_up(stop, _PACK_ROWS)  # whole blocks; within n_padded, itself a multiple of the block
        u = _unpack_int4(self.packed[start:end], end - start, width)[:stop - start]
        if self.kernel == "int4x2":
            half = width // 2
            codes = (16 * (u[:, :k] - 8) + u[:, half:half + k]).to(torch.int8)
            low = self.kernel_scales[self.kernel_scales.shape[0] // 2:, start:stop, 0]  # [groups, rows]
            return codes, (low[-1:] if self.config.group_size is None else low).t(), None
        groups = -(-k // self.kernel_group)
        scales = self.kernel_scales[:groups, start:stop, 0].t()
        zeros = None if self.config.symmetric else self.kernel_scales[:groups, start:stop, 1].t()
        return (u[:, :k] - 8).to(torch.int8), scales, zeros

    def codes(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """(signed codes int8 [out, in], scales bf16 [out, groups], zeros bf16 [out, groups] or None), read back
        from the kernel's packing."""
        return tuple(None if t is None else t.clone(memory_format=torch.contiguous_format)  # type: ignore[return-value]
                     for t in self._codes_rows(0, self.out_features))

    def dequantized_rows(self, start: int, stop: int) -> Tensor:
        """Output rows ``start:stop`` of the dequantized weight, float32 [stop - start, in] (``start`` a multiple
        of 64)."""
        return dequantize(*self._codes_rows(start, stop), group_size=self.config.group_size)

    def dequantized_tiles(self) -> Iterator[tuple[slice, Tensor]]:
        """(output rows, their dequantized weight float32 [rows, in]) in tiles of about ``_DEQUANT_TILE_ELEMENTS``
        values covering the weight: what needs the float weight reads it tile by tile, never whole."""
        step = max(_PACK_ROWS, _DEQUANT_TILE_ELEMENTS // self.in_features // _PACK_ROWS * _PACK_ROWS)
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            yield slice(start, stop), self.dequantized_rows(start, stop)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight, float32 [out, in] (computed on each access; forward never uses it)."""
        return self.dequantized_rows(0, self.out_features)

    def portable(self) -> dict[str, Tensor]:
        """The on-disk tensors (module docstring): ``qweight``, ``scales``, ``zeros`` (if any), ``bias`` (if any)."""
        codes, scales, zeros = self.codes()
        out = {"qweight": codes if self.config.format == "int8" else _nibbles(codes), "scales": scales}
        if zeros is not None:
            out["zeros"] = zeros
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.config.describe()}, kernel={self.kernel}, bias={self.bias is not None}")


# ---- whole models ------------------------------------------------------------------------------------------
def quantizable_linears(model: nn.Module, config: QuantConfig) -> Iterator[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every linear the config quantizes: attention and MLP
    projections of every block (each expert's, in a MoE; not the router; a cross-attention block's q/k/v/o, as in
    Mllama's decoder), and the LM head if ``config.lm_head``."""
    from lmforge.models.model import MLP, Attention, CrossAttention, CrossAttentionBlock, MoE

    for i, block in enumerate(model.model.layers):
        where = "cross_attn" if isinstance(block, CrossAttentionBlock) else "self_attn"
        attn = getattr(block, where)
        if isinstance(attn, (Attention, CrossAttention)):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield f"model.layers.{i}.{where}.{name}", attn, name
        mlps: list[tuple[str, nn.Module]] = []
        if isinstance(block.mlp, MoE):
            mlps = [(f"model.layers.{i}.mlp.experts.{e}", ex) for e, ex in enumerate(block.mlp.experts)]
        elif isinstance(block.mlp, MLP):
            mlps = [(f"model.layers.{i}.mlp", block.mlp)]
        for prefix, mlp in mlps:
            for name in ("gate_proj", "up_proj", "down_proj"):
                if hasattr(mlp, name):
                    yield f"{prefix}.{name}", mlp, name
    if config.lm_head:
        yield "lm_head", model, "lm_head"


def _vision_language_decoder(model: nn.Module) -> nn.Module | None:
    """A vision-language model's decoder (LLaVA, Mllama: ``language_model``), which is what gets quantized; None
    for a text model."""
    from lmforge.models.model import Transformer

    decoder = getattr(model, "language_model", None)
    return decoder if isinstance(decoder, Transformer) and not isinstance(model, Transformer) else None


def quantization_of(model: nn.Module) -> QuantConfig | None:
    """The model's ``QuantConfig`` if ``quantize_model`` (or loading a quantized checkpoint) made it, else None."""
    q = getattr(model, "quantization", None)
    return q if isinstance(q, QuantConfig) else None


def _check_cpu(model: nn.Module, what: str) -> None:
    device = next(model.parameters()).device
    if device.type not in ("cpu", "meta"):  # meta: a structure to load a state dict into
        raise LmforgeError(f"{what}: the low-bit kernels run on the CPU only; the model is on {device} "
                           "(load it with device='cpu')")


@torch.no_grad()
def quantize_model(model: nn.Module, quantize: "str | QuantConfig" = "int8", group_size: int | None = None,
                   symmetric: bool | None = None, lm_head: bool = True, kernel: str | None = None) -> nn.Module:
    """Replace the model's decoder linears by ``QuantizedLinear`` in place (and return it, in eval mode).

    ``quantize``: "int8" or "int4" (then ``group_size``, ``symmetric``, ``lm_head`` apply) or a ``QuantConfig``.
    ``kernel``: override the int8 kernel ("int4x2", the default, or "int8pack"); for measurements.
    A model on the meta device gets ``QuantizedLinear.empty`` layers: the structure a quantized model's state dict
    loads into (``load_state_dict(..., assign=True)``).
    """
    decoder = _vision_language_decoder(model)
    if decoder is not None:  # a vision-language model: its decoder (the vision side runs once per image)
        quantize_model(decoder, quantize, group_size, symmetric, lm_head, kernel)
        return model.eval()
    config = quantize if isinstance(quantize, QuantConfig) else QuantConfig.make(
        check_format(quantize), group_size, symmetric, lm_head)
    existing = quantization_of(model)
    if existing is not None:
        raise LmforgeError(f"this model is already quantized ({existing.describe()}); quantize the float "
                           "checkpoint instead (re-quantizing compounds the rounding error)")
    _check_cpu(model, "quantize")
    for name, parent, attr in list(quantizable_linears(model, config)):
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear):
            raise LmforgeError(f"{name} is a {type(linear).__name__}, not a plain nn.Linear (e.g. a LoRA "
                               "adapter): merge adapters into the weights before quantizing")
        if linear.weight.is_meta:
            quantized = QuantizedLinear.empty(linear.in_features, linear.out_features, config, kernel,
                                              bias=linear.bias is not None)
        else:
            quantized = QuantizedLinear.from_linear(linear, config, kernel)
        setattr(parent, attr, quantized)
    model.quantization = config
    return model.eval()


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every ``QuantizedLinear`` by an ``nn.Linear`` holding its dequantized weight, in the model's float
    dtype, and forget the quantization (in place; returns the model): the float model that the quantized one
    computes, up to the kernels' bfloat16 rounding of activations. It undoes ``quantize_model`` except for the
    rounding of the weights, and costs what a float model costs."""
    decoder = _vision_language_decoder(model)
    if decoder is not None:
        dequantize_model(decoder)
        return model
    from lmforge.models.model import replace_submodule

    dtype = model.model.embed_tokens.weight.dtype
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantizedLinear):
            continue
        # Built on meta so the throwaway init costs nothing, then given the real tensors.
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.weight.to(dtype))
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.to(dtype))
        replace_submodule(model, name, linear)
    if hasattr(model, "quantization"):
        del model.quantization
    return model


# ---- saving and loading -----------------------------------------------------------------------------------
def read_quantization_config(path: str | os.PathLike) -> QuantConfig | None:
    """config.json's ``quantization_config`` (None when it has none)."""
    from lmforge.io import read_json_object

    file = Path(path) / "config.json"
    raw = read_json_object(file, CheckpointError)
    if "quantization_config" not in raw:
        return None
    return QuantConfig.from_json(raw["quantization_config"], str(file))


def quantized_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor the model needs, portable layout for the quantized linears, float tensors as they are."""
    config = quantization_of(model)
    if config is None:
        raise LmforgeError("quantized_state_dict: the model is not quantized")
    out: dict[str, Tensor] = {}
    quantized = {name for name, _, _ in quantizable_linears(model, config)}
    for name in quantized:
        module = model.get_submodule(name)
        out.update({f"{name}.{k}": v.contiguous() for k, v in module.portable().items()})
    tied = not config.lm_head and model.config.tie_embeddings
    for key, tensor in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in quantized or (tied and key == "lm_head.weight"):
            continue
        out[key] = tensor.detach().cpu().contiguous()
    return out


def save_quantized(model: nn.Module, path: str | os.PathLike, extra_files: Sequence[str | os.PathLike] = (),
                   tokenizer: object | None = None) -> Path:
    """Write a quantized model directory: config.json (with ``quantization_config``), model.safetensors,
    generation_config.json, plus ``extra_files`` copied in (e.g. the source's tokenizer files) and
    ``tokenizer`` (an object with ``save(dir)``) if given."""
    from safetensors.torch import save_file

    from lmforge.io import atomic_directory
    from lmforge.models.model import Transformer

    config = quantization_of(model)
    if config is None:
        raise LmforgeError("save_quantized: the model is not quantized (use save_model)")
    if not isinstance(model, Transformer):
        raise CheckpointError(_NO_QUANTIZED_VLM)
    path = Path(path)
    state = quantized_state_dict(model)
    hf_config = model.config.to_hf()
    float_dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    hf_config["torch_dtype"] = hf_config["dtype"] = float_dtype
    hf_config["quantization_config"] = config.to_json()
    with atomic_directory(path) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "quant_method": QUANT_METHOD})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        gen = getattr(model, "generation_config", None)
        if not isinstance(gen, dict) or not gen:
            gen = {k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if getattr(model.config, k) is not None}
        if gen:
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for file in extra_files:
            shutil.copy2(file, tmp / Path(file).name)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def _expect(tensors: dict[str, Tensor], name: str, path: Path, dtype: torch.dtype | None,
            shape: tuple[int, ...]) -> Tensor:
    """Pop ``name`` from ``tensors``, checked against ``dtype`` (None: any floating dtype) and ``shape``."""
    if name not in tensors:
        raise CheckpointError(f"{path}: missing tensor {name} (a quantized linear's); is this checkpoint "
                              "complete and its quantization_config right?")
    t = tensors.pop(name)
    dtype_ok = t.dtype.is_floating_point if dtype is None else t.dtype == dtype
    if not dtype_ok or tuple(t.shape) != shape:
        want = "a float" if dtype is None else str(dtype).removeprefix("torch.")
        raise CheckpointError(f"{path}: tensor {name} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, "
                              f"expected {want} {list(shape)} for this quantization_config")
    return t


def load_quantized(path: str | os.PathLike, config: Any, quant: QuantConfig, dtype: torch.dtype,
                   device: torch.device, requested: QuantConfig | None = None, generation_config: dict | None = None,
                   kernel: str | None = None) -> nn.Module:
    """Build the model of ``config`` from a directory ``save_quantized`` wrote (``load_model`` calls this).
    ``requested``: ``load_model``'s ``quantize=``, which must match what the directory holds (or be None)."""
    from lmforge.models.checkpoint import _TensorSource
    from lmforge.models.model import Transformer

    path = Path(path)
    if requested is not None and requested != quant:
        raise CheckpointError(f"{path} is already quantized ({quant.describe()}); quantize={requested.describe()!r} "
                              "would quantize it again: load it without quantize=, or quantize the float checkpoint")
    if device.type != "cpu":
        raise CheckpointError(f"{path} is quantized ({quant.describe()}); its low-bit kernels run on the CPU only, "
                              f"not on {device}: load it with device='cpu'")
    source = _TensorSource(path)
    tensors = {name: source.get(name) for name in source.names()}
    with torch.device("meta"):
        model = Transformer(config)
    for name, parent, attr in list(quantizable_linears(model, quant)):
        linear = getattr(parent, attr)
        out, k = linear.out_features, linear.in_features
        groups = 1 if quant.group_size is None else -(-k // quant.group_size)
        if quant.format == "int8":
            codes = _expect(tensors, f"{name}.qweight", path, torch.int8, (out, k))
        else:
            codes = _from_nibbles(_expect(tensors, f"{name}.qweight", path, torch.uint8, (out, -(-k // 2))), k)
        scales = _expect(tensors, f"{name}.scales", path, torch.bfloat16, (out, groups))
        zeros = None
        if quant.format == "int4" and not quant.symmetric:
            zeros = _expect(tensors, f"{name}.zeros", path, torch.bfloat16, (out, groups))
        bias = None
        if linear.bias is not None:
            bias = _expect(tensors, f"{name}.bias", path, None, (out,)).to(dtype)
        setattr(parent, attr, QuantizedLinear.from_codes(codes, scales, zeros, bias, quant, kernel))
    expected = model.state_dict()
    floats = {}
    for name in list(tensors):
        if name in expected and expected[name].is_meta:
            want = tuple(expected[name].shape)
            if tuple(tensors[name].shape) != want:
                raise CheckpointError(f"{path}: tensor {name} has shape {list(tensors[name].shape)}, expected "
                                      f"{list(want)} from config.json")
            floats[name] = tensors.pop(name).to(dtype=dtype)
    if tensors:
        extra = sorted(tensors)
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise CheckpointError(f"{path}: unexpected tensors {', '.join(extra[:5])}{more} for {quant.describe()}; "
                              "is config.json for this checkpoint?")
    tied = not quant.lm_head and config.tie_embeddings
    missing = sorted(n for n, t in expected.items() if t.is_meta and n not in floats
                     and not (tied and n == "lm_head.weight"))
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                          if len(missing) > 1 else ""))
    model.load_state_dict(floats, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.quantization = quant
    if generation_config is not None:
        model.generation_config = generation_config
    return model.eval()


# ---- lmforge quantize ---------------------------------------------------------------------------------------
_NO_QUANTIZED_VLM = ("quantized vision-language checkpoints cannot be written yet; keep the float checkpoint and load "
                     "it with quantize='int8'|'int4' (or --quantize) instead")

# The files of a model directory that are not weights or config and that chat/serve need beside the weights.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def _quantize_args(p: Any) -> None:
    p.add_argument("path", help="a Hugging Face model directory (config.json + safetensors) with float weights")
    p.add_argument("--to", required=True, choices=FORMATS, help="int8 (per output channel, or grouped) or int4 (grouped)")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"group size: {', '.join(map(str, INT4_GROUP_SIZES))} (int4 default {DEFAULT_INT4_GROUP_SIZE}; "
                        "int8 default: one scale per output channel)")
    p.add_argument("--symmetric", action="store_true", help="int4 without zero points (Q4_0-like)")
    p.add_argument("--float-lm-head", action="store_true", help="keep the LM head in float")
    p.add_argument("--out", required=True, help="the directory to write (replaced atomically if it exists)")


def _register() -> None:
    from lmforge.commands import command

    @command("quantize", "weight-only int8/int4 quantization of a model directory (CPU low-bit kernels)")(
        _quantize_args)
    def quantize_cmd(args: Any) -> int:
        from lmforge.models.checkpoint import config_model_type, load_model
        from lmforge.models.vision import VISION_LANGUAGE_MODEL_TYPES

        src, out = Path(args.path), Path(args.out)
        if config_model_type(src) in VISION_LANGUAGE_MODEL_TYPES:  # before loading it only to refuse
            raise LmforgeError(_NO_QUANTIZED_VLM)
        if out.resolve() == src.resolve():
            raise LmforgeError("--out must differ from the source directory (it would replace the float weights)")
        config = QuantConfig.make(args.to, args.group_size, True if args.symmetric else None,
                                  not args.float_lm_head)
        model = load_model(src, dtype=torch.float32, device="cpu", quantize=config)
        extra = [src / f for f in _TOKENIZER_FILES if (src / f).is_file()]
        save_quantized(model, out, extra_files=extra)
        size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
        print(f"wrote {out}: {config.describe()}, model.safetensors {size / 2**20:.1f} MiB")
        return 0


_register()

__all__ = ["FORMATS", "INT4_GROUP_SIZES", "QuantConfig", "QuantizedLinear", "quantize_model", "quantize_int8",
           "quantize_int4", "dequantize", "save_quantized", "load_quantized", "read_quantization_config",
           "quantization_of", "quantized_state_dict", "check_format", "as_config", "dequantize_model"]
