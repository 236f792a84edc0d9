"""float32 linears with a oneDNN-packed copy of their weight, for CPU inference with several rows.

A CPU GEMM with a few rows (decode steps of 8-32 sequences) spends much of its time re-laying out the weight
matrix; oneDNN can lay it out once ("pack" it into its blocked format) and reuse that for every call, as
inductor's CPU weight freezing does. Here it is a module swap, so eager code, the paged engine and
``generate`` all get it:

    pack_linears(model)     # every nn.Linear of a float32 CPU model -> PackedLinear (in place)
    unpack_linears(model)   # and back

A ``PackedLinear`` is an ``nn.Linear`` (same Parameter objects, so tied weights stay tied, the state dict and
training are unchanged) that also holds the packed copy: one more copy of every linear weight in memory. It
uses the copy only where it is faster (measured on a 2-core x86 CPU, ``benchmarks/serving.py`` and the rows
below): without autograd or autocast, and for calls with >= 16 rows, or >= 4 rows on a matrix of >= 1M entries; one-row
decode GEMVs are 15-35% slower packed. An in-place update of the weight (an optimizer step, ``load_state_dict``)
bumps its version counter and the copy is re-packed on the next call, so a model that is trained between
generations (RL) never runs on a stale copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.models.model import replace_submodule

# When the packed copy wins (median of 40 calls, 2 threads; dense MKL vs packed oneDNN): 768x768 is 0.7x at
# 1 row, 0.9x at 8, 1.35x at 17; 2048x768 and 768x2048 are 0.8x at 1 row, 1.4-1.7x at 4-17 rows; every shape
# is within 10% either way from ~128 rows.
PACKED_MIN_ROWS = 16
PACKED_MIN_ROWS_LARGE = 4
LARGE_WEIGHT = 1 << 20
PACKING_HINT_ROWS = 64  # oneDNN's packing takes a batch-size hint; 64 measured best over 1-128 rows


def packing_available() -> bool:
    """oneDNN (mkldnn) is built into this torch and usable on this CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Linear):
    """``nn.Linear`` that also keeps its float32 weight in oneDNN's packed layout for inference calls."""

    @classmethod
    def of(cls, linear: nn.Linear) -> "PackedLinear":
        weight = linear.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise LmforgeError(f"packed weights are for float32 on CPU; this linear is {weight.dtype} on "
                               f"{weight.device}")
        packed = _same_parameters(cls, linear)
        packed._packed, packed._packed_version = None, -1
        packed._min_rows = PACKED_MIN_ROWS_LARGE if weight.numel() >= LARGE_WEIGHT else PACKED_MIN_ROWS
        return packed

    def packed_weight(self) -> Tensor:
        """The packed copy, re-packed if the weight changed in place since it was made."""
        if self._packed is None or self._packed_version != self.weight._version:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().contiguous(),
                                                                       PACKING_HINT_ROWS)
            self._packed_version = self.weight._version
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows < self._min_rows or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu") or (
                torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)  # autocast's precision and autograd are the dense op's
        bias = None if self.bias is None else self.bias.detach()
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), self.packed_weight(), bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def unpacked(self) -> nn.Linear:
        return _same_parameters(nn.Linear, self)


def _same_parameters(kind: type, linear: nn.Linear) -> nn.Linear:
    """A ``kind`` (nn.Linear or PackedLinear) holding ``linear``'s own weight and bias Parameters and hooks."""
    out = kind.__new__(kind)
    nn.Module.__init__(out)
    out.in_features, out.out_features = linear.in_features, linear.out_features
    out.weight, out.bias = linear.weight, linear.bias  # the same Parameters: tying and training intact
    out._forward_hooks.update(linear._forward_hooks)
    out._forward_pre_hooks.update(linear._forward_pre_hooks)
    return out


def _swap(model: nn.Module, kind: type, make) -> int:
    # exact type: LoRA wrappers and quantized linears are left alone
    swapped = [(name, module) for name, module in model.named_modules() if type(module) is kind]
    for name, module in swapped:
        replace_submodule(model, name, make(module))
    return len(swapped)


def why_not_packable(model: nn.Module) -> str | None:
    """None when ``pack_linears(model)`` applies (oneDNN in this torch, a float32 model on CPU), else why not."""
    if not packing_available():
        return "packed weights need PyTorch built with oneDNN (torch.backends.mkldnn)"
    param = next(model.parameters(), None)
    if param is not None and (param.dtype != torch.float32 or param.device.type != "cpu"):
        return f"packed weights are for float32 models on CPU; this one is {param.dtype} on {param.device}"
    return None


def pack_linears(model: nn.Module) -> int:
    """Swap every float32 CPU ``nn.Linear`` of ``model`` for a ``PackedLinear`` (in place); returns how many.

    Costs one more copy of every linear weight in memory. A model ``why_not_packable`` names a reason for is an
    error: the packed layout is only faster for float32 on a CPU with oneDNN.
    """
    reason = why_not_packable(model)
    if reason is not None:
        raise LmforgeError(reason)
    return _swap(model, nn.Linear, PackedLinear.of)


def unpack_linears(model: nn.Module) -> int:
    """Undo ``pack_linears`` (in place), dropping the packed copies."""
    return _swap(model, PackedLinear, PackedLinear.unpacked)


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())
