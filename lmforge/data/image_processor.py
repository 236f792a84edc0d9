"""Images -> ``pixel_values`` as transformers' CLIP/SigLIP image processors make them, and the LLaVA processor
that pairs them with the tokenizer (image placeholders expanded to one token per image feature).

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
from lmforge.models.llava import LlavaConfig, read_llava_config

if TYPE_CHECKING:
    from PIL import Image as PILImage

ImageInput = Union["PILImage.Image", str, os.PathLike]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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
SUPPORTED_IMAGE_PROCESSORS = tuple(_DEFAULTS)


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
        kind = str(d.get("image_processor_type", "CLIPImageProcessor")).removesuffix("Fast").removesuffix("Pil")
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
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            raise CheckpointError(f"{path} has no preprocessor_config.json (the image processor's settings)")
        return cls.from_dict(read_json_object(file, CheckpointError), str(file))

    def validate(self, source: str) -> None:
        Image = _pil()
        if self.resample not in {r.value for r in Image.Resampling}:
            raise ConfigError(f"{source}: resample {self.resample} is not a Pillow filter "
                              f"({', '.join(f'{r.value} {r.name.lower()}' for r in Image.Resampling)})")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"{source}: {name} needs 3 values (R, G, B), got {list(getattr(self, name))}")
        if any(s == 0 for s in self.image_std):
            raise ConfigError(f"{source}: image_std has a zero: {list(self.image_std)}")
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
        if not isinstance(image, Image.Image):
            image = load_image(image)
        if self.do_convert_rgb:
            image = _to_rgb(image)
        if self.do_resize:
            height, width = self._resized_size(image.height, image.width)
            image = image.resize((width, height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(image)
        if pixels.ndim == 2:  # a single-channel image kept as it is (do_convert_rgb false)
            pixels = pixels[..., None]
        pixels = np.moveaxis(pixels, -1, 0)  # [C, H, W]
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = pixels.astype(np.float32, copy=False)
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels, dtype=np.float32)

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


# ---- tokenizer + images -------------------------------------------------------------------------------
Message = Mapping[str, Any]


class LlavaProcessor:
    """Text (or chat messages with image parts) and images -> ``input_ids``, ``attention_mask``, ``pixel_values``.

    Every image placeholder token in the text (``image_token``, the model's ``image_token_index``) becomes
    ``num_image_tokens`` of them: the decoder positions that the image's projected features fill.
    """

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, config: LlavaConfig) -> None:
        self.tokenizer, self.image_processor, self.config = tokenizer, image_processor, config
        self.image_token_id = config.image_token_id
        token = tokenizer.backend.id_to_token(self.image_token_id)
        if token is None:
            raise CheckpointError(f"the tokenizer has no token with id {self.image_token_id}, the model's "
                                  "image_token_index (the image placeholder)")
        self.image_token: str = token
        self.num_image_tokens = config.num_image_tokens
        side = config.vision.image_size
        if image_processor.output_size not in (None, (side, side)):
            raise ConfigError(f"the image processor makes {image_processor.output_size[0]}x"
                              f"{image_processor.output_size[1]} images but the vision tower takes {side}x{side}")

    def __call__(self, text: str | Sequence[str], images: ImageInput | Sequence[ImageInput] | None = None,
                 add_special_tokens: bool = True) -> dict[str, Tensor]:
        """Prompts holding one ``image_token`` per image (in order, across the batch) and the images.
        A batch is left-padded (for generation), with ``attention_mask`` 0 on the padding."""
        texts = [text] if isinstance(text, str) else list(text)
        return self._encode([self.tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts], images)

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
            flat = [self._flatten(m, i, found_images) for i, m in enumerate(chat)]
            ids.append(self.tokenizer.apply_chat_template(flat, add_generation_prompt=add_generation_prompt,
                                                          **template_kwargs))
        if images is None:
            images = found_images or None
        elif found_images:
            raise LmforgeError("images were given both inside the messages and as images=; give them one way")
        return self._encode(ids, images)

    def _flatten(self, message: Message, index: int, found: list[ImageInput]) -> dict[str, Any]:
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

    def _encode(self, rows: list[list[int]], images: ImageInput | Sequence[ImageInput] | None) -> dict[str, Tensor]:
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        n_images = len(images or ())
        n_placeholders = sum(row.count(self.image_token_id) for row in rows)
        if n_placeholders != n_images:
            raise LmforgeError(f"the text has {n_placeholders} image placeholder(s) ({self.image_token!r}) but "
                               f"{n_images} image(s) were given; put one {self.image_token} where each image goes")
        expanded = [[t for i in row for t in ([i] * self.num_image_tokens if i == self.image_token_id else [i])]
                    for row in rows]
        width = max(len(row) for row in expanded)
        pad = self.tokenizer.pad_id_or_eos
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in expanded], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in expanded],
                                      dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            out["pixel_values"] = self.image_processor(list(images))
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def load_processor(path: str | os.PathLike) -> LlavaProcessor:
    """The processor of a LLaVA model directory: its tokenizer, ``preprocessor_config.json`` and config.json."""
    return LlavaProcessor(load_tokenizer(path), ImageProcessor.from_pretrained(path), read_llava_config(path))


__all__ = ["ImageProcessor", "LlavaProcessor", "load_processor", "load_image", "SUPPORTED_IMAGE_PROCESSORS"]
