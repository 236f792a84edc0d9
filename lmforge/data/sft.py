"""SFT data: chat JSONL -> the tokenizer's chat template -> ids with loss only on assistant tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.train.objectives import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise LmforgeError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LmforgeError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise LmforgeError(f"{where}: message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise LmforgeError(f"{where}: message {i} ({m['role']}) needs string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise LmforgeError(f"{where}: no assistant message, so nothing to learn from")
    return messages


def read_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from JSONL records ``{"messages": [{"role": ..., "content": ...}, ...]}``."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"data file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise LmforgeError(f"{path}:{n}: record has no 'messages' field")
            out.append(validate_messages(record["messages"], f"{path}:{n}"))
    if not out:
        raise LmforgeError(f"{path} holds no conversations")
    return out


def encode_conversation(tokenizer, messages: Sequence[dict[str, str]]) -> dict[str, torch.Tensor]:
    """input_ids and labels: labels[t] = ids[t+1] where that token is an assistant token, else -100."""
    ids, mask = tokenizer.apply_chat_template(list(messages), tokenize=True, return_assistant_mask=True)
    ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
    labels = torch.where(mask[1:], ids[1:], torch.full_like(ids[1:], IGNORE_INDEX))
    return {"input_ids": ids[:-1], "labels": labels}


class SFTDataset:
    """Encoded conversations. Longer than ``max_len``: cut from the right (``truncate``) or dropped; counted."""

    def __init__(self, conversations: Sequence[Sequence[dict[str, str]]], tokenizer, max_len: int,
                 truncate: bool = True) -> None:
        self.items: list[dict[str, torch.Tensor]] = []
        self.truncated = self.dropped = 0
        for conv in conversations:
            item = encode_conversation(tokenizer, conv)
            if len(item["input_ids"]) > max_len:
                if not truncate:
                    self.dropped += 1
                    continue
                item = {k: v[:max_len] for k, v in item.items()}
                self.truncated += 1
            if (item["labels"] != IGNORE_INDEX).any():
                self.items.append(item)
            else:
                self.dropped += 1  # truncation removed every assistant token
        if not self.items:
            raise LmforgeError(f"no usable conversations (dropped {self.dropped}); raise data.seq_len?")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]
