"""Steering vectors: per-layer directions added to the residual stream, and their files.

A ``SteeringVector`` holds one direction [d] per layer; ``Steering`` is a vector at a scale, the thing a
generation applies: ``scale * direction[i]`` is added to the output of block i (``blocks.{i}.hook_resid_post``,
every position, prompt and generated tokens alike). That is exactly where llama.cpp applies a control
vector: its graph adds ``direction.{il}`` to ``l_out`` of layer ``il`` (0-based, after the feed-forward
residual), so a GGUF control vector written here means the same thing in llama.cpp and back.

Files (``SteeringVector.save`` / ``load``, by suffix):
  - ``.gguf``: llama.cpp's control-vector format (what repeng's ``export_gguf`` and llama.cpp's
    ``cvector-generator`` write, what ``--control-vector`` reads): architecture ``controlvector``, keys
    ``controlvector.model_hint`` (string) and ``controlvector.layer_count`` (uint32), one float32 tensor
    ``direction.{il}`` [n_embd] per layer. llama.cpp rejects ``direction.0`` (it never steers layer 0's
    output), so saving a layer-0 direction as GGUF is an error here too.
  - ``.safetensors``: the same tensor names, with width, model hint and metadata in the header; any layer.

Extraction (contrastive activation addition, PCA) lives in ``lmforge.interp.steering``; this module is
the part generation needs, so ``generate`` and the engine can apply vectors without importing ``interp``.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.models.model import Hook

HOOK_POINT = "blocks.{}.hook_resid_post"  # where a direction is added: the output of block i
GGUF_ARCH = "controlvector"
MAX_GGUF_LAYER = 4096  # a sanity bound on direction.{il}; no released model has more layers


def _width_of(model_or_width: Any) -> tuple[int, int | None]:
    """(hidden width, number of layers or None) of a Transformer, a Config, or a bare width."""
    config = getattr(model_or_width, "config", model_or_width)
    if isinstance(config, int):
        return config, None
    return int(config.hidden_size), int(config.num_layers)


@dataclass(eq=False)
class SteeringVector:
    """Directions ``{layer: Tensor[width]}`` (float32, CPU) for the residual stream of one model shape.

    ``model_hint``: the architecture it was made for (GGUF ``controlvector.model_hint``; informational).
    ``metadata``: free-form strings kept in the file (e.g. how it was extracted).
    """

    directions: dict[int, Tensor]
    width: int | None = None
    model_hint: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.directions:
            raise LmforgeError("a steering vector needs at least one layer's direction")
        clean: dict[int, Tensor] = {}
        for layer, vec in self.directions.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise LmforgeError(f"steering vector layers must be block indices >= 0, got {layer!r}")
            vec = torch.as_tensor(vec).detach()
            if vec.ndim != 1:
                raise LmforgeError(f"the direction for layer {layer} must be 1-D [width], got shape "
                                   f"{tuple(vec.shape)}")
            if not vec.is_floating_point():
                raise LmforgeError(f"the direction for layer {layer} must be floating point, got {vec.dtype}")
            clean[layer] = vec.to("cpu", torch.float32).contiguous()
        widths = {v.shape[0] for v in clean.values()}
        if len(widths) > 1:
            raise LmforgeError(f"steering vector directions have different widths: {sorted(widths)}")
        (found,) = widths
        if self.width is not None and self.width != found:
            raise LmforgeError(f"steering vector width {self.width} but its directions have {found} entries")
        if not all(bool(torch.isfinite(v).all()) for v in clean.values()):
            raise LmforgeError("steering vector directions contain NaN or infinity")
        self.directions = dict(sorted(clean.items()))
        self.width = found
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    def check(self, model_or_width: Any, what: str = "steering vector") -> "SteeringVector":
        """Raise ``LmforgeError`` unless this vector fits the model (a ``Transformer``, ``Config`` or width):
        same residual width, layers that exist."""
        width, num_layers = _width_of(model_or_width)
        if self.width != width:
            raise LmforgeError(f"{what} has width {self.width} but the model's hidden size is {width}; "
                               "it was made for a different model")
        if num_layers is not None and self.layers[-1] >= num_layers:
            raise LmforgeError(f"{what} has a direction for layer {self.layers[-1]} but the model has "
                               f"{num_layers} layers (0..{num_layers - 1})")
        return self

    @property
    def fingerprint(self) -> str:
        """A digest of layers and values: equal fingerprints mean the same intervention (prefix-cache keys)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for layer, vec in self.directions.items():
                h.update(layer.to_bytes(4, "little"))
                h.update(vec.numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def hooks(self, scale: float = 1.0) -> dict[str, Hook]:
        """Forward hooks (``model(..., hooks=...)``) that add ``scale * direction`` at each layer's resid_post."""
        return Steering(self, scale).hooks()

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.gguf`` (llama.cpp control vector) or ``.safetensors`` file, chosen by the suffix."""
        path = Path(path)
        kind = path.suffix.lower()
        if kind == ".gguf":
            _save_gguf(self, path)
        elif kind == ".safetensors":
            _save_safetensors(self, path)
        else:
            raise LmforgeError(f"{path}: steering vectors are saved as .gguf (llama.cpp control vector) or "
                               f".safetensors; got suffix {path.suffix or '(none)'!r}")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SteeringVector":
        """Read a file written by ``save``, llama.cpp's ``cvector-generator`` or repeng (GGUF by magic bytes)."""
        path = Path(path)
        if not path.is_file():
            raise LmforgeError(f"steering vector file {path} does not exist")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return _load_gguf(path)
        if path.suffix.lower() == ".safetensors":
            return _load_safetensors(path)
        raise LmforgeError(f"{path} is neither a GGUF control vector nor a .safetensors steering vector")


@dataclass(eq=False)
class Steering:
    """A steering vector at a scale: what ``generate(steering=...)`` and ``SamplingParams.steering`` apply.

    ``name``: how a server registry calls it (for messages only; identity is ``key``).
    """

    vector: SteeringVector
    scale: float = 1.0
    name: str | None = None
    _deltas: dict[tuple, dict[int, Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.vector, SteeringVector):
            raise LmforgeError(f"Steering needs a SteeringVector, got {type(self.vector).__name__}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise LmforgeError(f"steering scale must be a finite number, got {self.scale!r}")
        self.scale = float(self.scale)

    @property
    def key(self) -> str:
        """Identity of the intervention: a steered request's KV differs from an unsteered one's, so the
        prefix cache keys its blocks by this (same vector values and scale -> shareable)."""
        return f"{self.vector.fingerprint}:{self.scale!r}"

    @property
    def is_noop(self) -> bool:
        return self.scale == 0.0

    def deltas(self, device: torch.device | str, dtype: torch.dtype) -> dict[int, Tensor]:
        """``{layer: scale * direction}`` on ``device`` in ``dtype`` (computed in float32, cached)."""
        cache_key = (str(torch.device(device)), dtype)
        if cache_key not in self._deltas:
            self._deltas[cache_key] = {layer: (self.scale * vec).to(device=device, dtype=dtype)
                                       for layer, vec in self.vector.directions.items()}
        return self._deltas[cache_key]

    def hooks(self) -> dict[str, Hook]:
        """Forward hooks adding ``scale * direction`` to ``blocks.{i}.hook_resid_post`` (any device/dtype)."""
        hooks = {}
        for layer in self.vector.layers:
            def add(x: Tensor, name: str, layer: int = layer) -> Tensor:
                return x + self.deltas(x.device, x.dtype)[layer]
            hooks[HOOK_POINT.format(layer)] = add
        return hooks


# ---- GGUF (llama.cpp control vectors) ------------------------------------------------------------
def _gguf():
    try:
        import gguf
    except ImportError:
        raise LmforgeError("reading or writing GGUF control vectors needs the gguf package: pip install gguf") \
            from None
    return gguf


def _replace_atomically(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: a crash never leaves a half-written vector file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_gguf(vector: SteeringVector, path: Path) -> None:
    if 0 in vector.directions:
        raise LmforgeError("llama.cpp control vectors cannot hold a layer-0 direction (llama.cpp rejects "
                           "direction.0 and never steers the first block's output); drop layer 0 or save as "
                           ".safetensors")
    gguf = _gguf()

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", vector.model_hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(vector.directions))
        for key, value in vector.metadata.items():
            writer.add_string(f"lmforge.{key}", value)  # llama.cpp ignores keys it does not know
        for layer, vec in vector.directions.items():
            writer.add_tensor(f"direction.{layer}", vec.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _replace_atomically(path, write)


def _field_value(field: Any) -> Any:
    return field.contents()  # decodes strings and scalars (gguf-py releases since late 2024)


def _load_gguf(path: Path) -> SteeringVector:
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on damaged files
        raise LmforgeError(f"{path}: not a readable GGUF file ({e})") from None
    arch = reader.get_field("general.architecture")
    arch = _field_value(arch) if arch is not None else None
    if arch != GGUF_ARCH:
        raise LmforgeError(f"{path}: GGUF architecture is {arch!r}, not {GGUF_ARCH!r}; is it a model rather than "
                           "a control vector?")
    hint = reader.get_field(f"{GGUF_ARCH}.model_hint")
    directions: dict[int, Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction":
            continue
        if not index.isdigit() or int(index) == 0 or int(index) > MAX_GGUF_LAYER:
            raise LmforgeError(f"{path}: tensor {tensor.name!r} is not a valid direction.{{layer}} (layer >= 1)")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise LmforgeError(f"{path}: {tensor.name} is {tensor.tensor_type.name}; control vectors are float32")
        directions[int(index)] = torch.from_numpy(tensor.data.reshape(-1).copy())
    if not directions:
        raise LmforgeError(f"{path}: no direction.{{layer}} tensors in this control vector")
    metadata = {name[len("lmforge."):]: str(_field_value(f)) for name, f in reader.fields.items()
                if name.startswith("lmforge.")}
    return SteeringVector(directions, model_hint=str(_field_value(hint)) if hint is not None else "",
                          metadata=metadata)


# ---- safetensors -------------------------------------------------------------------------------
def _save_safetensors(vector: SteeringVector, path: Path) -> None:
    from safetensors.torch import save_file

    header = {"format": "lmforge-steering", "width": str(vector.width), "model_hint": vector.model_hint,
              **{f"lmforge.{k}": v for k, v in vector.metadata.items()}}
    tensors = {f"direction.{layer}": vec for layer, vec in vector.directions.items()}
    _replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def _load_safetensors(path: Path) -> SteeringVector:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header: Mapping[str, str] = f.metadata() or {}
            directions = {}
            for name in f.keys():  # noqa: SIM118  (safe_open is not a dict)
                prefix, _, index = name.partition(".")
                if prefix != "direction" or not index.isdigit():
                    raise LmforgeError(f"{path}: tensor {name!r} is not a direction.{{layer}}")
                directions[int(index)] = f.get_tensor(name)
    except SafetensorError as e:
        raise LmforgeError(f"{path}: not a readable safetensors file ({e})") from None
    if not directions:
        raise LmforgeError(f"{path}: no direction.{{layer}} tensors in this file")
    width = header.get("width")
    metadata = {k[len("lmforge."):]: v for k, v in header.items() if k.startswith("lmforge.")}
    return SteeringVector(directions, width=int(width) if width and width.isdigit() else None,
                          model_hint=header.get("model_hint", ""), metadata=metadata)
