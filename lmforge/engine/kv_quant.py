"""KV-cache quantizers for the paged engine: KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache") at 2 or 4 bits, and a per-token int8 baseline. Pure functions on tensors; the pools
that use them live in ``model_runner.QuantizedModelRunner``.

KIVI's point is the asymmetry between keys and values:
  - keys have a few outlier *channels* (large magnitudes in fixed dimensions), so they are quantized
    per channel: min/max statistics over a group of G tokens for each (head, channel);
  - values have no such channel structure, and attention mixes them per token, so they are quantized
    per token: statistics over groups of channels of one token.
Both are asymmetric (zero point = the group's minimum, scale = range / (2^bits - 1)). Per-channel key
statistics need G tokens before a group can be quantized; the most recent tokens stay in full precision
(the paper's ``residual_length``) and are quantized once a whole group has accumulated. In the paged engine
the key group is one KV block (G = block_size), so a block is quantized when it is full.
``transformers``' ``QuantizedCache`` quantizes keys and values along the same axis; KIVI does not.

Storage per block of ``bs`` tokens, per layer and KV head, head_dim D, b bits, value group g:
  keys:   codes bs x D x b/8 bytes (packed), scale + zero per channel: 2 x D float16
  values: codes bs x D x b/8 bytes (packed), scale + zero per token and group: 2 x bs x D/g float16
  int8:   codes bs x D bytes each for keys and values, one float16 scale per token (symmetric, no zero).

Scales and zero points are float16 (as in KIVI). They are rounded *outward* (zero down, scale up) so the
grid still covers the group's [min, max]: every element then dequantizes within scale / 2 of its value,
the bound the tests check, and nothing clips.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.errors import LmforgeError

FP16_MAX = 65504.0  # larger K/V magnitudes saturate (they would be inf in the float16 statistics)
FP16_TINY = 2.0 ** -14  # smallest normal float16: the floor of a scale, so a constant group never divides by 0


@dataclass(frozen=True)
class KVQuantFormat:
    """One quantized KV-cache layout. ``kind`` "kivi": keys per channel over the block's tokens, values per
    token over ``value_group`` channels, ``bits`` 2 or 4, packed into uint8. ``kind`` "int8": both per token,
    symmetric, one scale per (token, head)."""

    name: str
    kind: str  # "kivi" | "int8"
    bits: int

    def value_group(self, head_dim: int) -> int:
        """Channels per value group: 32 (KIVI's group size) when it divides head_dim, else the whole head."""
        return 32 if head_dim % 32 == 0 else head_dim

    def check(self, head_dim: int) -> None:
        if self.kind == "kivi" and (head_dim * self.bits) % 8:
            raise LmforgeError(f"kv_cache_dtype {self.name!r} packs {8 // self.bits} codes per byte, so head_dim "
                               f"must be a multiple of {8 // self.bits}; this model's is {head_dim}")

    def payload_shapes(self, block_size: int, kv_heads: int, head_dim: int
                       ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per block: name -> (shape without the block dimension, dtype) of every tensor the format stores."""
        bs, k, d = block_size, kv_heads, head_dim
        if self.kind == "int8":
            return {"k_codes": ((bs, k, d), torch.int8), "k_scale": ((bs, k, 1), torch.float16),
                    "v_codes": ((bs, k, d), torch.int8), "v_scale": ((bs, k, 1), torch.float16)}
        packed, groups = d * self.bits // 8, d // self.value_group(d)
        return {"k_codes": ((bs, k, packed), torch.uint8), "k_scale": ((k, d), torch.float16),
                "k_zero": ((k, d), torch.float16),
                "v_codes": ((bs, k, packed), torch.uint8), "v_scale": ((bs, k, groups), torch.float16),
                "v_zero": ((bs, k, groups), torch.float16)}

    def bytes_per_block(self, block_size: int, kv_heads: int, head_dim: int) -> int:
        """Bytes one block of one layer occupies (codes and statistics, keys and values)."""
        total = 0
        for shape, dtype in self.payload_shapes(block_size, kv_heads, head_dim).values():
            n = dtype.itemsize
            for s in shape:
                n *= s
            total += n
        return total

    def quantize(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """Quantize whole blocks k, v [m, block_size, K, D] into the tensors of ``payload_shapes`` (leading m)."""
        if self.kind == "int8":
            kc, ks = quantize_int8_per_token(k)
            vc, vs = quantize_int8_per_token(v)
            return {"k_codes": kc, "k_scale": ks, "v_codes": vc, "v_scale": vs}
        kc, ks, kz = quantize_keys_per_channel(k, self.bits)
        vc, vs, vz = quantize_values_per_token(v, self.bits, self.value_group(v.shape[-1]))
        return {"k_codes": kc, "k_scale": ks, "k_zero": kz, "v_codes": vc, "v_scale": vs, "v_zero": vz}

    def dequantize(self, p: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values [m, block_size, K, D] in ``dtype`` from ``quantize``'s tensors."""
        if self.kind == "int8":
            return dequantize_int8(p["k_codes"], p["k_scale"], dtype), dequantize_int8(p["v_codes"], p["v_scale"], dtype)
        return (dequantize_keys_per_channel(p["k_codes"], p["k_scale"], p["k_zero"], self.bits, dtype),
                dequantize_values_per_token(p["v_codes"], p["v_scale"], p["v_zero"], self.bits, dtype))


KV_CACHE_DTYPES: dict[str, KVQuantFormat | None] = {
    "auto": None,  # the model's dtype, unquantized
    "kivi2": KVQuantFormat("kivi2", "kivi", 2),
    "kivi4": KVQuantFormat("kivi4", "kivi", 4),
    "int8": KVQuantFormat("int8", "int8", 8),
}


def parse_kv_cache_dtype(name: str) -> KVQuantFormat | None:
    """The format named ``name`` (None for "auto", the unquantized cache); unknown names list the valid ones."""
    if name not in KV_CACHE_DTYPES:
        raise LmforgeError(f"unknown kv_cache_dtype {name!r}; valid: {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name]


# ---- bit packing --------------------------------------------------------------------------------------
def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes < 2^bits along the last dim (length divisible by 8 / bits) into uint8 bytes: code i
    lands in byte i // (8 / bits) at bit offset bits * (i % (8 / bits))."""
    per = 8 // bits
    grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)  # disjoint bit ranges: the sum is an OR


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """Inverse of ``pack_bits``: uint8 codes, the last dim 8 / bits times longer."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)


# ---- float16 statistics rounded outward ---------------------------------------------------------------
def _half_down(x: Tensor) -> Tensor:
    """The largest float16 <= x (x float32, clamped to the float16 range)."""
    h = x.clamp(-FP16_MAX, FP16_MAX).half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -float("inf"))), h)


def _half_up(x: Tensor) -> Tensor:
    """The smallest float16 >= x (x float32, clamped to the float16 range)."""
    h = x.clamp(-FP16_MAX, FP16_MAX).half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def minmax_quantize(x: Tensor, dim: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric ``bits``-bit quantization with min/max statistics reduced over ``dim`` (kept, size 1):
    codes uint8 (unpacked, same shape as x), scale and zero float16. Dequantize: code * scale + zero."""
    levels = (1 << bits) - 1
    xf = x.float().clamp(-FP16_MAX, FP16_MAX)
    zero = _half_down(xf.amin(dim, keepdim=True))
    z = zero.float()
    # Scale from the rounded zero, rounded up, so (max - zero) / scale <= levels: the top code is in range.
    scale = _half_up(((xf.amax(dim, keepdim=True) - z) / levels).clamp(min=FP16_TINY))
    codes = torch.round((xf - z) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def minmax_dequantize(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    return (codes.float() * scale.float() + zero.float()).to(dtype)


# ---- KIVI ---------------------------------------------------------------------------------------------
def quantize_keys_per_channel(k: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keys [m, G, K, D] (m groups of G tokens): statistics per (group, head, channel) over the G tokens.
    Returns packed codes [m, G, K, D * bits / 8], scale and zero [m, K, D]."""
    codes, scale, zero = minmax_quantize(k, 1, bits)
    return pack_bits(codes, bits), scale.squeeze(1), zero.squeeze(1)


def dequantize_keys_per_channel(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    return minmax_dequantize(unpack_bits(packed, bits), scale.unsqueeze(1), zero.unsqueeze(1), dtype)


def quantize_values_per_token(v: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Values [m, G, K, D]: statistics per (token, head, group of ``group`` channels). Returns packed codes
    [m, G, K, D * bits / 8], scale and zero [m, G, K, D / group]."""
    *lead, d = v.shape
    codes, scale, zero = minmax_quantize(v.reshape(*lead, d // group, group), -1, bits)
    return pack_bits(codes.reshape(*lead, d), bits), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_values_per_token(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    codes = unpack_bits(packed, bits)
    *lead, d = codes.shape
    groups = scale.shape[-1]
    grouped = codes.view(*lead, groups, d // groups)
    return minmax_dequantize(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), dtype).reshape(*lead, d)


# ---- int8 baseline ------------------------------------------------------------------------------------
def quantize_int8_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 over the last dim (one head of one token): codes in [-127, 127], scale float16 [..., 1]
    rounded up from absmax / 127 so nothing clips."""
    xf = x.float().clamp(-FP16_MAX, FP16_MAX)
    scale = _half_up((xf.abs().amax(-1, keepdim=True) / 127).clamp(min=FP16_TINY))
    codes = torch.round(xf / scale.float()).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (codes.float() * scale.float()).to(dtype)
