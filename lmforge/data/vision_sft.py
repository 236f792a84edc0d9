"""Visual instruction data: chat JSONL with images -> the model's processor -> ids, labels on assistant tokens only,
and the image tensors of a batch.

A record is ``{"messages": [...], "images": ["path.png", ...]}`` (the convention of LLaVA's and TRL's data): user
content is a string or a list of parts ``{"type": "text", "text": ...}`` / ``{"type": "image"}``, one image part
per entry of ``images``, in order; relative image paths are relative to the JSONL file. Images are read when a
batch is built, so a dataset holds paths, not pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.data.chat import validate_messages
from lmforge.data.sft import IGNORE_INDEX, Overflow, SequenceTooLong, iter_conversation_records, pad_collate
from lmforge.data.image_processor import load_image
from lmforge.errors import LmforgeError

# Batch fields a vision-language model's forward takes besides input_ids and attention_mask.
IMAGE_INPUT_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


def _count_image_parts(messages: list, where: str) -> int:
    count = 0
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                    raise LmforgeError(f"{where}: message {i} content parts must be {{'type': 'text', 'text': ...}} "
                                       f"or {{'type': 'image'}}, got {part!r}")
                count += part["type"] == "image"
    return count


def read_vision_chat_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records ``{"messages", "images"}`` with image paths resolved; a bad record is an ``LmforgeError`` naming
    ``file:line`` (a missing image file, or image parts that do not match the number of images, say both)."""
    path = Path(path)
    out = []
    for where, record in iter_conversation_records(path):
        messages = record["messages"]
        n_parts = _count_image_parts(messages if isinstance(messages, list) else [], where)
        flat = [{**m, "content": ""} if isinstance(m, dict) and isinstance(m.get("content"), list) else m
                for m in messages] if isinstance(messages, list) else messages
        validate_messages(flat, where, needs_assistant=True)  # roles and the rest; parts were checked above
        images = record.get("images", [])
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise LmforgeError(f"{where}: 'images' must be a list of image paths")
        if len(images) != n_parts:
            raise LmforgeError(f"{where}: the messages have {n_parts} image part(s) but 'images' lists {len(images)}")
        resolved = [p if p.is_absolute() else path.parent / p for p in map(Path, images)]
        for image in resolved:  # opened now: a broken file stops the run before training, naming its line
            try:
                load_image(image)
            except LmforgeError as e:
                raise LmforgeError(f"{where}: {e}") from None
        out.append({"messages": messages, "images": resolved, "where": where})
    if not out:
        raise LmforgeError(f"{path} holds no conversations")
    return out


def encode_vision_conversation(processor, messages: Sequence[dict]) -> dict[str, torch.Tensor]:
    """``input_ids`` (image placeholders expanded to the decoder's positions) and shifted ``labels`` (assistant
    tokens only; never an image position) for one conversation."""
    flat = [processor.flatten_message(m, i, []) for i, m in enumerate(messages)]
    ids, mask = processor.tokenizer.apply_chat_template(flat, tokenize=True, return_assistant_mask=True)
    image = processor.image_token_id
    expanded_mask = [a for i, a in zip(ids, mask) for a in ([0] * processor.tokens_per_image if i == image else [a])]
    ids_t = torch.tensor(processor.expand(ids), dtype=torch.long)
    mask_t = torch.tensor(expanded_mask, dtype=torch.bool)
    labels = torch.where(mask_t[1:], ids_t[1:], torch.full_like(ids_t[1:], IGNORE_INDEX))
    return {"input_ids": ids_t[:-1], "labels": labels}


class VisionSFTDataset:
    """Encoded conversations with their image paths, each at most ``max_len`` decoder positions (image tokens
    included). Longer ones follow ``truncate`` as ``SFTDataset`` does, except that a cut never splits an image:
    a conversation whose cut would drop image tokens is dropped (counted) instead."""

    def __init__(self, records: Sequence[dict[str, Any]], processor, max_len: int,
                 truncate: Overflow | bool = "truncate") -> None:
        mode = ("truncate" if truncate else "drop") if isinstance(truncate, bool) else truncate
        if mode not in ("truncate", "drop", "error"):
            raise LmforgeError(f"truncate must be 'truncate', 'drop' or 'error', got {truncate!r}")
        self.processor = processor
        self.items: list[dict[str, Any]] = []
        self.truncated = self.dropped = 0
        image = processor.image_token_id
        for n, record in enumerate(records):
            item = encode_vision_conversation(processor, record["messages"])
            placeholders = int((item["input_ids"] == image).sum())  # an answer follows: none sits in the last slot
            if placeholders != processor.tokens_per_image * len(record["images"]):
                # e.g. the text itself spells the placeholder token: the images would shift between rows
                raise LmforgeError(f"{record.get('where', f'conversation {n}')}: the rendered conversation holds "
                                   f"{placeholders // processor.tokens_per_image} image placeholder(s) "
                                   f"({processor.image_token!r}) for {len(record['images'])} image(s)")
            if len(item["input_ids"]) > max_len:
                if mode == "error":
                    raise SequenceTooLong(f"conversation {n} is {len(item['input_ids'])} positions (images "
                                          f"included), longer than max_len={max_len}")
                cut_images = bool((item["input_ids"][max_len:] == image).any())
                if mode == "drop" or cut_images:
                    self.dropped += 1
                    continue
                item = {k: v[:max_len] for k, v in item.items()}
                self.truncated += 1
            if (item["labels"] != IGNORE_INDEX).any():
                self.items.append({**item, "images": list(record["images"])})
            else:
                self.dropped += 1
        if not self.items:
            raise LmforgeError(f"no usable conversations (dropped {self.dropped}); raise data.seq_len? (an image "
                               f"takes {processor.tokens_per_image} positions)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def collate(self, items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded ids, labels and attention mask (``pad_collate``), and the images' tensors for the model
        (``IMAGE_INPUT_KEYS``), read from disk now."""
        batch = pad_collate(items, pad_id)
        images = [load_image(p) for it in items for p in it["images"]]
        if images:
            batch.update(self.processor.image_inputs(batch["input_ids"].tolist(), images))
        return batch


__all__ = ["IMAGE_INPUT_KEYS", "VisionSFTDataset", "encode_vision_conversation", "read_vision_chat_jsonl"]
