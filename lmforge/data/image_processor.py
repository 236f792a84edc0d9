"""Images -> ``pixel_values`` as transformers' CLIP/SigLIP and Mllama image processors make them, and the
LLaVA and Mllama processors that pair them with the tokenizer (LLaVA: image placeholders expanded to one token
per image feature; Mllama: one ``<|image|>`` token per image, and a cross-attention mask saying which text tokens
see which image's tiles).

``preprocessor_config.json`` drives the image steps, in transformers' order: RGB conversion (transparency
composited onto white) -> resize (shortest edge, or a fixed height x width) with Pillow's resampling filter ->
center crop (zero-padded where the image is smaller) -> rescale (x * 1/255, in float64, then float32) ->
normalize ((x - mean) / std in float32) -> channels first. Decoding and resizing are Pillow's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import Tensor

from lmforge.data.tokenizer import Tokenizer, load_tokenizer
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.io import read_json_object
from lmforge.models.checkpoint import config_model_type
from lmforge.models.llava import LlavaConfig, read_llava_config
from lmforge.models.mllama import MllamaConfig, read_mllama_config, tile_arrangements

if TYPE_CHECKING:
    from PIL import Image as PILImage

ImageInput = Union["PILImage.Image", str, os.PathLike]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
# transformers' class defaults, for fields a preprocessor_config.json leaves out ("Fast"/"Pil" variants alike).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                               crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                               do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                               do_convert_rgb=True, default_to_square=False),
    "SiglipImageProcessor": dict(do_resize=True, size={"height": 224, "width": 224}, resample=3,
                                 do_center_crop=False, crop_size=None, do_rescale=True, rescale_factor=1 / 255,
                                 do_normalize=True, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                                 do_convert_rgb=True, default_to_square=False),
}
_MLLAMA_DEFAULTS: dict[str, Any] = dict(size={"height": 224, "width": 224}, resample=2, do_rescale=True,
                                        rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_STANDARD_MEAN,
                                        image_std=IMAGENET_STANDARD_STD, do_convert_rgb=True, do_resize=True,
                                        do_pad=True, max_image_tiles=4)
SUPPORTED_IMAGE_PROCESSORS = (*_DEFAULTS, "MllamaImageProcessor")


def _processor_kind(d: Mapping[str, Any], default: str) -> str:
    """transformers' image_processor_type without its backend suffix ("Fast", "Pil")."""
    return str(d.get("image_processor_type", default)).removesuffix("Fast").removesuffix("Pil")


def _read_preprocessor_config(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no preprocessor_config.json (the image processor's settings)")
    return file, read_json_object(file, CheckpointError)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise LmforgeError("images need Pillow: pip install pillow") from None
    return Image


def load_image(path: str | os.PathLike) -> "PILImage.Image":
    """The image file at ``path``, decoded by Pillow; an ``LmforgeError`` naming the file if it cannot be read."""
    Image = _pil()
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()  # Image.open only reads the header: decode now, so a truncated file fails here
            return image.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # Pillow's UnidentifiedImageError is an OSError; truncated data raises OSError, broken headers SyntaxError.
        raise LmforgeError(f"cannot read image file {path}: {e}; is it a valid image (PNG, JPEG, ...)?") from None


def _size_dict(value: Any, key: str, default_to_square: bool) -> dict[str, int]:
    """transformers' size spellings: {"shortest_edge": n}, {"height": h, "width": w}, or a bare int."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = int(value)
        return {"height": n, "width": n} if default_to_square else {"shortest_edge": n}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, Mapping) and set(value) in ({"shortest_edge"}, {"height", "width"}):
        return {k: int(v) for k, v in value.items()}
    raise ConfigError(f"preprocessor_config.json {key} {value!r} is not supported: use {{\"shortest_edge\": n}} or "
                      "{\"height\": h, \"width\": w}")


@dataclass
class ImageProcessor:
    """transformers' CLIPImageProcessor / SiglipImageProcessor, on Pillow and NumPy."""

    do_resize: bool = True
    size: dict[str, int] | None = None
    resample: int = 3  # PIL.Image.Resampling: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming
    do_center_crop: bool = True
    crop_size: dict[str, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN
    image_std: Sequence[float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "preprocessor_config.json") -> "ImageProcessor":
        kind = _processor_kind(d, "CLIPImageProcessor")
        if kind not in _DEFAULTS:
            raise ConfigError(f"{source}: image_processor_type {d.get('image_processor_type')!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_IMAGE_PROCESSORS)}")
        merged = {**_DEFAULTS[kind], **{k: v for k, v in d.items() if v is not None}}
        square = bool(merged["default_to_square"])
        try:
            processor = cls(
                do_resize=bool(merged["do_resize"]), size=_size_dict(merged["size"], "size", square),
                resample=int(merged["resample"]), do_center_crop=bool(merged["do_center_crop"]),
                crop_size=(_size_dict(merged["crop_size"], "crop_size", True)
                           if merged["do_center_crop"] else None),
                do_rescale=bool(merged["do_rescale"]), rescale_factor=float(merged["rescale_factor"]),
                do_normalize=bool(merged["do_normalize"]), image_mean=tuple(map(float, merged["image_mean"])),
                image_std=tuple(map(float, merged["image_std"])), do_convert_rgb=bool(merged["do_convert_rgb"]))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: malformed field ({e})") from None
        processor.validate(source)
        return processor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ImageProcessor":
        """From a model directory's ``preprocessor_config.json``."""
        file, d = _read_preprocessor_config(path)
        return cls.from_dict(d, str(file))

    def validate(self, source: str) -> None:
        _check_pixel_steps(self, source)
        if not self.do_center_crop and self.do_resize and "shortest_edge" in (self.size or {}):
            raise ConfigError(f"{source}: resizing the shortest edge without a center crop gives images of varying "
                              "size; set do_center_crop or a fixed size {\"height\", \"width\"}")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every processed image, None when it depends on the input."""
        if self.do_center_crop and self.crop_size:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and self.size and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        size = self.size or {}
        if "height" in size:
            return size["height"], size["width"]
        # torchvision's rule, as transformers: the short side becomes n, the long side int(n * long / short).
        n = size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(n * long / short)
        return (new_long, n) if width <= height else (n, new_long)

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """One image -> float32 [3, H, W]."""
        Image = _pil()
        image = _as_image(image, self.do_convert_rgb)
        if self.do_resize:
            height, width = self._resized_size(image.height, image.width)
            image = image.resize((width, height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(image)
        if pixels.ndim == 2:  # a single-channel image kept as it is (do_convert_rgb false)
            pixels = pixels[..., None]
        pixels = np.moveaxis(pixels, -1, 0)  # [C, H, W]
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        return _rescale_normalize(pixels, self)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """Images (PIL images or file paths) -> pixel_values [N, 3, H, W] float32."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise LmforgeError("no images to process")
        arrays = [self.preprocess(image) for image in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise LmforgeError(f"the processed images differ in size ({sorted(shapes)}); the image processor needs a "
                               "center crop or a fixed size")
        return torch.from_numpy(np.stack(arrays))


def _check_pixel_steps(processor: Any, source: str) -> None:
    """The resampling filter, mean and std every image processor here has."""
    Image = _pil()
    if processor.resample not in {r.value for r in Image.Resampling}:
        raise ConfigError(f"{source}: resample {processor.resample} is not a Pillow filter "
                          f"({', '.join(f'{r.value} {r.name.lower()}' for r in Image.Resampling)})")
    for name in ("image_mean", "image_std"):
        if len(getattr(processor, name)) != 3:
            raise ConfigError(f"{source}: {name} needs 3 values (R, G, B), got {list(getattr(processor, name))}")
    if any(s == 0 for s in processor.image_std):
        raise ConfigError(f"{source}: image_std has a zero: {list(processor.image_std)}")


def _rescale_normalize(pixels: np.ndarray, processor: Any) -> np.ndarray:
    """[C, H, W] -> float32: x * rescale_factor (in float64, then float32), then (x - mean) / std in float32, in
    transformers' order and precision."""
    if processor.do_rescale:
        pixels = (pixels.astype(np.float64) * processor.rescale_factor).astype(np.float32)
    if processor.do_normalize:
        pixels = pixels.astype(np.float32, copy=False)
        mean = np.asarray(processor.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(processor.image_std, dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _as_image(image: ImageInput, convert_rgb: bool) -> "PILImage.Image":
    """A PIL image (a path is decoded), converted to RGB when asked."""
    Image = _pil()
    if not isinstance(image, Image.Image):
        image = load_image(image)
    return _to_rgb(image) if convert_rgb else image


def _to_rgb(image: "PILImage.Image") -> "PILImage.Image":
    """RGB, with any transparency composited onto white (transformers' ``convert_to_rgb``)."""
    Image = _pil()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centered height x width window of [C, H, W]; an image smaller than it is centered on zeros first."""
    h, w = pixels.shape[-2:]
    if h < height or w < width:
        padded = np.zeros((pixels.shape[0], max(h, height), max(w, width)), dtype=pixels.dtype)
        top, left = math.ceil((padded.shape[1] - h) / 2), math.ceil((padded.shape[2] - w) / 2)
        padded[:, top:top + h, left:left + w] = pixels
        pixels, h, w = padded, padded.shape[1], padded.shape[2]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[:, top:top + height, left:left + width]


# ---- Mllama: images as tiles ------------------------------------------------------------------------------
def best_tile_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(height, width) of the tile arrangement the image fits best: the smallest upscale if one upscales, else
    the least downscale; ties go to the smaller area (transformers' ``get_optimal_tiled_canvas``, NumPy as it)."""
    canvases = np.array(tile_arrangements(max_tiles)) * tile
    scale_h, scale_w = canvases[:, 0] / height, canvases[:, 1] / width
    scales = np.where(scale_w > scale_h, scale_h, scale_w)  # each canvas's scale keeping the aspect ratio
    upscales = scales[scales >= 1]
    chosen = canvases[scales == (upscales.min() if len(upscales) else scales[scales < 1].max())]
    best = chosen[np.argmin(chosen[:, 0] * chosen[:, 1])] if len(chosen) > 1 else chosen[0]
    return int(best[0]), int(best[1])


def fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int, tile: int) -> tuple[int, int]:
    """The resized (height, width): aspect ratio kept, each side clipped to [tile, canvas side] first
    (transformers' ``get_image_size_fit_to_canvas``)."""
    target_width = int(np.clip(width, tile, canvas_width))
    target_height = int(np.clip(height, tile, canvas_height))
    scale_h, scale_w = target_height / height, target_width / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_height), target_width
    return target_height, min(math.floor(width * scale_h) or 1, target_width)


@dataclass
class MllamaImageProcessor:
    """transformers' MllamaImageProcessor (Pillow backend): each image is resized (aspect ratio kept) to fit the
    best arrangement of up to ``max_image_tiles`` square tiles, zero-padded on the bottom and right to fill it,
    rescaled and normalized, then cut into tiles row by row."""

    size: dict[str, int] | None = None  # {"height": tile, "width": tile}
    resample: int = 2  # bilinear
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Sequence[float] = IMAGENET_STANDARD_MEAN
    image_std: Sequence[float] = IMAGENET_STANDARD_STD
    do_convert_rgb: bool = True
    max_image_tiles: int = 4

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "preprocessor_config.json") -> "MllamaImageProcessor":
        if _processor_kind(d, "MllamaImageProcessor") != "MllamaImageProcessor":
            raise ConfigError(f"{source}: image_processor_type {d.get('image_processor_type')!r} is not a Mllama "
                              "image processor")
        merged = {**_MLLAMA_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
        if not (merged["do_resize"] and merged["do_pad"]):
            raise ConfigError(f"{source}: the Mllama image processor always resizes and pads (do_resize and do_pad "
                              "must be true)")
        try:
            size = _size_dict(merged["size"], "size", True)
            processor = cls(size=size, resample=int(merged["resample"]), do_rescale=bool(merged["do_rescale"]),
                            rescale_factor=float(merged["rescale_factor"]), do_normalize=bool(merged["do_normalize"]),
                            image_mean=tuple(map(float, merged["image_mean"])),
                            image_std=tuple(map(float, merged["image_std"])),
                            do_convert_rgb=bool(merged["do_convert_rgb"]),
                            max_image_tiles=int(merged["max_image_tiles"]))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: malformed field ({e})") from None
        if "height" not in size or size["height"] != size["width"]:
            raise ConfigError(f"{source}: size must be a square {{\"height\": n, \"width\": n}} (one tile), got {size}")
        if processor.max_image_tiles < 1:
            raise ConfigError(f"{source}: max_image_tiles must be positive, got {processor.max_image_tiles}")
        _check_pixel_steps(processor, source)
        return processor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MllamaImageProcessor":
        file, d = _read_preprocessor_config(path)
        return cls.from_dict(d, str(file))

    @property
    def tile_size(self) -> int:
        return self.size["height"]

    def tiles(self, image: ImageInput) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> (float32 tiles [rows * columns, 3, tile, tile], (rows, columns))."""
        Image = _pil()
        image = _as_image(image, self.do_convert_rgb)
        tile = self.tile_size
        canvas_h, canvas_w = best_tile_canvas(image.height, image.width, self.max_image_tiles, tile)
        height, width = fit_to_canvas(image.height, image.width, canvas_h, canvas_w, tile)
        image = image.resize((width, height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(image)
        pixels = np.moveaxis(pixels[..., None] if pixels.ndim == 2 else pixels, -1, 0)  # [C, H, W]
        canvas = np.zeros((pixels.shape[0], canvas_h, canvas_w), dtype=pixels.dtype)  # padded before rescaling
        canvas[:, :height, :width] = pixels
        pixels = _rescale_normalize(canvas, self)
        rows, cols = canvas_h // tile, canvas_w // tile
        tiles = pixels.reshape(-1, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4).reshape(rows * cols, -1, tile, tile)
        return np.ascontiguousarray(tiles), (rows, cols)

    def __call__(self, images: Sequence[Sequence[ImageInput]]) -> dict[str, Any]:
        """Images per batch row (a row may have none) -> ``pixel_values`` [B, images, max_image_tiles, 3, tile,
        tile] (zeros for padding tiles and images), ``aspect_ratio_ids`` [B, images] (0: padding image),
        ``aspect_ratio_mask`` [B, images, max_image_tiles] (1: a real tile; a padding image's first tile counts,
        as in transformers) and ``num_tiles`` (per row, per image)."""
        rows = [[self.tiles(image) for image in row] for row in images]
        most = max((len(row) for row in rows), default=0)
        if most == 0:
            raise LmforgeError("no images to process")
        channels = next(t for row in rows for t, _ in row).shape[1]
        tile, max_tiles = self.tile_size, self.max_image_tiles
        arrangements = tile_arrangements(max_tiles)
        pixel_values = np.zeros((len(rows), most, max_tiles, channels, tile, tile), dtype=np.float32)
        aspect_ratio_ids = np.zeros((len(rows), most), dtype=np.int64)
        aspect_ratio_mask = np.zeros((len(rows), most, max_tiles), dtype=np.int64)
        aspect_ratio_mask[:, :, 0] = 1
        for i, row in enumerate(rows):
            for j, (tiles, arrangement) in enumerate(row):
                pixel_values[i, j, :len(tiles)] = tiles
                aspect_ratio_ids[i, j] = arrangements.index(arrangement) + 1
                aspect_ratio_mask[i, j, :len(tiles)] = 1
        return {"pixel_values": torch.from_numpy(pixel_values), "aspect_ratio_ids": torch.from_numpy(aspect_ratio_ids),
                "aspect_ratio_mask": torch.from_numpy(aspect_ratio_mask),
                "num_tiles": [[len(tiles) for tiles, _ in row] for row in rows]}


# ---- tokenizer + images -------------------------------------------------------------------------------
Message = Mapping[str, Any]


class _ImageTextProcessor:
    """What the LLaVA and Mllama processors share: the image placeholder token, text and chat messages with
    image parts to token ids, the image count check, left padding. ``_encode`` makes the model's tensors."""

    def __init__(self, tokenizer: Tokenizer, image_token_id: int) -> None:
        self.tokenizer, self.image_token_id = tokenizer, image_token_id
        token = tokenizer.backend.id_to_token(image_token_id)
        if token is None:
            raise CheckpointError(f"the tokenizer has no token with id {image_token_id}, the model's "
                                  "image_token_index (the image placeholder)")
        self.image_token: str = token

    def __call__(self, text: str | Sequence[str], images: ImageInput | Sequence[ImageInput] | None = None,
                 add_special_tokens: bool = True) -> dict[str, Tensor]:
        """Prompts holding one ``image_token`` per image (in order, across the batch) and the images.
        A batch is left-padded (for generation), with ``attention_mask`` 0 on the padding."""
        texts = [text] if isinstance(text, str) else list(text)
        return self._encode([self.tokenizer.encode(self._prompt(t), add_special_tokens=add_special_tokens)
                             for t in texts], images)

    def prompt_text(self, text: str) -> str:
        """The text this processor tokenizes for a prompt (Mllama: its BOS after the leading image tokens, as
        transformers' processor places it); what code that encodes prompts itself must start from."""
        return self._prompt(text)

    def _prompt(self, text: str) -> str:
        return text

    # Decoder positions per image placeholder: LLaVA splices one feature per position, Mllama keeps one token.
    tokens_per_image = 1

    def expand(self, ids: Sequence[int]) -> list[int]:
        """``ids`` with each image placeholder repeated ``tokens_per_image`` times (the decoder's positions)."""
        n, image = self.tokens_per_image, self.image_token_id
        return [t for i in ids for t in ([i] * n if i == image else [i])]

    def image_inputs(self, rows: list[list[int]], images: Sequence[ImageInput]) -> dict[str, Tensor]:
        """The model's image tensors for padded, expanded ``rows`` holding one placeholder per image, in order."""
        raise NotImplementedError

    def encode_ids(self, rows: list[list[int]], images: ImageInput | Sequence[ImageInput] | None) -> dict[str, Tensor]:
        """Token-id rows holding one (unexpanded) placeholder per image, and the images in order -> the model's
        left-padded tensors (what ``__call__`` and ``apply_chat_template`` return for text)."""
        return self._encode(rows, images)

    def _encode(self, rows: list[list[int]], images: ImageInput | Sequence[ImageInput] | None) -> dict[str, Tensor]:
        images = self._checked_images(rows, images)
        out = self._left_padded([self.expand(row) for row in rows])
        if images:
            out.update(self.image_inputs(out["input_ids"].tolist(), images))
        return out

    def apply_chat_template(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
                            images: ImageInput | Sequence[ImageInput] | None = None,
                            add_generation_prompt: bool = True, **template_kwargs: Any) -> dict[str, Tensor]:
        """Chats whose message ``content`` is a string or a list of parts, ``{"type": "text", "text": ...}`` and
        ``{"type": "image"}`` (optionally with the image itself under ``"image"``, or give ``images`` in order).

        The tokenizer's template renders string content, so each message's parts are joined into one string, an
        image part becoming the image token: templates written for part lists (that loop over ``content``) are
        not supported yet, and a template that drops the image tokens is caught by the count check."""
        batch = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        found_images: list[ImageInput] = []
        ids = []
        for chat in batch:
            flat = [self.flatten_message(m, i, found_images) for i, m in enumerate(chat)]
            ids.append(self.tokenizer.apply_chat_template(flat, add_generation_prompt=add_generation_prompt,
                                                          **template_kwargs))
        if images is None:
            images = found_images or None
        elif found_images:
            raise LmforgeError("images were given both inside the messages and as images=; give them one way")
        return self._encode(ids, images)

    def flatten_message(self, message: Message, index: int, found: list[ImageInput]) -> dict[str, Any]:
        """``message`` with string content: its parts joined, each image part as the image token (an image given
        inside the part is appended to ``found``)."""
        content = message.get("content")
        if not isinstance(content, (list, tuple)):
            return dict(message)
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "image":
                parts.append(self.image_token)
                if part.get("image") is not None:
                    found.append(part["image"])
            else:
                raise LmforgeError(f"chat message {index}: content parts must be {{'type': 'text', 'text': str}} or "
                                   f"{{'type': 'image'}}, got {part!r}")
        return {**message, "content": "".join(parts)}

    def _checked_images(self, rows: list[list[int]], images: ImageInput | Sequence[ImageInput] | None) -> list:
        """The images as a list, one per placeholder in the rows (else an ``LmforgeError`` saying both counts)."""
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        images = list(images or ())
        n_placeholders = sum(row.count(self.image_token_id) for row in rows)
        if n_placeholders != len(images):
            raise LmforgeError(f"the text has {n_placeholders} image placeholder(s) ({self.image_token!r}) but "
                               f"{len(images)} image(s) were given; put one {self.image_token} where each image goes")
        return images

    def _left_padded(self, rows: list[list[int]]) -> dict[str, Tensor]:
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_id_or_eos
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class LlavaProcessor(_ImageTextProcessor):
    """Text (or chat messages with image parts) and images -> ``input_ids``, ``attention_mask``, ``pixel_values``.

    Every image placeholder token in the text (``image_token``, the model's ``image_token_index``) becomes
    ``num_image_tokens`` of them: the decoder positions that the image's projected features fill.
    """

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, config: LlavaConfig) -> None:
        super().__init__(tokenizer, config.image_token_id)
        self.image_processor, self.config = image_processor, config
        self.tokens_per_image = config.num_image_tokens
        side = config.vision.image_size
        if image_processor.output_size not in (None, (side, side)):
            raise ConfigError(f"the image processor makes {image_processor.output_size[0]}x"
                              f"{image_processor.output_size[1]} images but the vision tower takes {side}x{side}")

    def image_inputs(self, rows: list[list[int]], images: Sequence[ImageInput]) -> dict[str, Tensor]:
        return {"pixel_values": self.image_processor(list(images))}


def cross_attention_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """Per image token of a row, the token range [start, end) that sees the image: from the image token to the
    next one, or to the end for the last; consecutive image tokens all see to the end of the next span (as in
    transformers' ``get_cross_attention_token_mask``)."""
    starts = [i for i, token in enumerate(ids) if token == image_token_id]
    spans = [[start, end] for start, end in zip(starts, [*starts[1:], len(ids)])]
    last_end = len(ids)
    for span in reversed(spans):
        if span[0] == span[1] - 1:
            span[1] = last_end
        last_end = span[1]
    return [(start, end) for start, end in spans]


class MllamaProcessor(_ImageTextProcessor):
    """Text (or chat messages with image parts) and images -> ``input_ids``, ``attention_mask``, ``pixel_values``,
    ``aspect_ratio_ids``, ``aspect_ratio_mask`` and ``cross_attention_mask`` [B, T, images, tiles] (1 where a text
    token sees a tile of an image: from the image's ``<|image|>`` token on, see ``cross_attention_spans``).

    The image token stays one token (the decoder reads the images through cross-attention). As transformers'
    processor does for text prompts, the tokenizer's BOS text is put in front when the prompt lacks it (after
    any leading image tokens). The images go to the rows in order, as many per row as it has image tokens.
    """

    def __init__(self, tokenizer: Tokenizer, image_processor: MllamaImageProcessor, config: MllamaConfig) -> None:
        super().__init__(tokenizer, config.image_token_id)
        self.image_processor, self.config = image_processor, config
        vision = config.vision
        if image_processor.tile_size != vision.image_size or image_processor.max_image_tiles != vision.max_num_tiles:
            raise ConfigError(f"the image processor makes up to {image_processor.max_image_tiles} tiles of "
                              f"{image_processor.tile_size}x{image_processor.tile_size} but the vision encoder takes "
                              f"{vision.max_num_tiles} tiles of {vision.image_size}x{vision.image_size}")

    def _prompt(self, text: str) -> str:
        bos = self.tokenizer.bos_token
        if not bos or bos in text:
            return text
        leading = 0
        while text.startswith(self.image_token, leading * len(self.image_token)):
            leading += 1
        cut = leading * len(self.image_token)
        return text[:cut] + bos + text[cut:]

    def image_inputs(self, rows: list[list[int]], images: Sequence[ImageInput]) -> dict[str, Tensor]:
        per_row, taken = [], 0
        for row in rows:
            count = row.count(self.image_token_id)
            per_row.append(list(images[taken:taken + count]))
            taken += count
        image_inputs = self.image_processor(per_row)
        num_tiles = image_inputs.pop("num_tiles")
        mask = torch.zeros(len(rows), len(rows[0]), image_inputs["pixel_values"].shape[1],
                           self.image_processor.max_image_tiles, dtype=torch.long)
        for i, ids in enumerate(rows):  # positions in the padded rows
            for j, (start, end) in enumerate(cross_attention_spans(ids, self.image_token_id)):
                mask[i, start:end, j, :num_tiles[i][j]] = 1
        return {**image_inputs, "cross_attention_mask": mask}


def load_processor(path: str | os.PathLike) -> LlavaProcessor | MllamaProcessor:
    """The processor of a LLaVA or Mllama model directory: its tokenizer, ``preprocessor_config.json`` and
    config.json."""
    if config_model_type(path) == "mllama":
        return MllamaProcessor(load_tokenizer(path), MllamaImageProcessor.from_pretrained(path),
                               read_mllama_config(path))
    return LlavaProcessor(load_tokenizer(path), ImageProcessor.from_pretrained(path), read_llava_config(path))


__all__ = ["ImageProcessor", "LlavaProcessor", "MllamaImageProcessor", "MllamaProcessor", "load_processor",
           "load_image", "SUPPORTED_IMAGE_PROCESSORS", "cross_attention_spans", "tile_arrangements"]
