"""SFT data: chat JSONL -> the tokenizer's chat template -> ids with loss only on assistant tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from lmforge.data.chat import validate_messages
from lmforge.errors import LmforgeError
from lmforge.io import iter_jsonl

# The label of a position that carries no loss (prompt tokens, padding); PyTorch's cross-entropy default.
IGNORE_INDEX = -100
# What to do with a conversation longer than max_len: cut it from the right, drop it (counted), or fail.
Overflow = Literal["truncate", "drop", "error"]


class SequenceTooLong(LmforgeError):
    """A conversation does not fit ``max_len`` and truncation was not allowed."""


def read_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from JSONL records ``{"messages": [{"role": ..., "content": ...}, ...]}``.

    Every record is validated; a problem raises LmforgeError naming ``file:line`` and what is wrong.
    """
    out = [validate_messages(record["messages"], where, needs_assistant=True)
           for where, record in iter_conversation_records(path)]
    if not out:
        raise LmforgeError(f"{path} holds no conversations")
    return out


def iter_conversation_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """``(file:line, record)`` for each JSONL record, every one a dict with a ``messages`` field (else an
    LmforgeError naming the line); a missing file is an LmforgeError too."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"data file {path} does not exist")
    for where, record in iter_jsonl(path):
        if not isinstance(record, dict) or "messages" not in record:
            raise LmforgeError(f"{where}: record has no 'messages' field")
        yield where, record


def encode_conversation(tokenizer, messages: Sequence[dict[str, str]], max_len: int | None = None,
                        truncate: bool = True) -> dict[str, torch.Tensor]:
    """input_ids and shifted labels for one conversation, rendered with the tokenizer's chat template.

    labels[t] = ids[t+1] when that *target* token is an assistant token (the template's assistant mask),
    else -100, so the loss covers only what the assistant says (prompt-loss masking).
    Longer than ``max_len`` (counted in input positions): cut from the right when ``truncate``, else
    ``SequenceTooLong`` is raised; never silently.
    """
    ids, mask = tokenizer.apply_chat_template(list(messages), tokenize=True, return_assistant_mask=True)
    if len(ids) != len(mask):
        raise LmforgeError(f"chat template returned {len(ids)} ids but an assistant mask of {len(mask)}")
    if len(ids) < 2:
        raise LmforgeError("a rendered conversation needs at least two tokens to have a target")
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
    labels = torch.where(mask_t[1:], ids_t[1:], torch.full_like(ids_t[1:], IGNORE_INDEX))
    item = {"input_ids": ids_t[:-1], "labels": labels}
    if max_len is not None and len(labels) > max_len:
        if not truncate:
            raise SequenceTooLong(f"conversation is {len(labels)} tokens, longer than max_len={max_len}")
        item = {k: v[:max_len] for k, v in item.items()}
    return item


class SFTDataset:
    """Encoded conversations, each at most ``max_len`` tokens.

    ``truncate`` for conversations longer than ``max_len``: "truncate" (or True) cuts from the right and
    counts it in ``truncated``; "drop" (or False) skips it and counts it in ``dropped``; "error" raises,
    naming the conversation. A conversation left without any assistant target (e.g. truncated before the
    first answer) is dropped and counted too.
    """

    def __init__(self, conversations: Sequence[Sequence[dict[str, str]]], tokenizer, max_len: int,
                 truncate: Overflow | bool = "truncate") -> None:
        mode = ("truncate" if truncate else "drop") if isinstance(truncate, bool) else truncate  # bool: recipes
        if mode not in ("truncate", "drop", "error"):
            raise LmforgeError(f"truncate must be 'truncate', 'drop' or 'error', got {truncate!r}")
        self.items: list[dict[str, torch.Tensor]] = []
        self.truncated = self.dropped = 0
        for n, conv in enumerate(conversations):
            item = encode_conversation(tokenizer, conv)
            if len(item["input_ids"]) > max_len:
                if mode == "error":
                    raise SequenceTooLong(f"conversation {n} is {len(item['input_ids'])} tokens, longer than "
                                          f"max_len={max_len}; raise the sequence length or allow truncation")
                if mode == "drop":
                    self.dropped += 1
                    continue
                item = {k: v[:max_len] for k, v in item.items()}
                self.truncated += 1
            if (item["labels"] != IGNORE_INDEX).any():
                self.items.append(item)
            else:
                self.dropped += 1  # nothing left to learn from
        if not self.items:
            raise LmforgeError(f"no usable conversations (dropped {self.dropped}); raise data.seq_len?")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def pad_collate(items: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad items into a batch: input_ids [B,T] padded with ``pad_id``, labels -100 on padding, and
    attention_mask 1 on real tokens."""
    if not items:
        raise ValueError("cannot collate an empty list of items")
    longest = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = torch.as_tensor(it["input_ids"])
        labels[row, :n] = torch.as_tensor(it["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class ReplayMixture:
    """SFT items followed by ``round(len(sft) * fraction / (1 - fraction))`` replay items (pretraining windows,
    loss on every token), so that ``fraction`` of the mixture is replay. Replay windows are drawn without
    repetition in a seeded order, cycling through them again only if more are asked for than exist. The
    trainer's sampler shuffles the whole index space, so replay lands evenly across batches."""

    def __init__(self, sft: Sequence[dict[str, torch.Tensor]], replay: Sequence[dict[str, torch.Tensor]],
                 fraction: float, seed: int = 0) -> None:
        if not 0.0 <= fraction < 1.0:
            raise LmforgeError(f"replay fraction must be in [0, 1), got {fraction}")
        if fraction > 0 and len(replay) == 0:
            raise LmforgeError("replay was asked for but the replay data holds no windows")
        self.sft, self.replay = sft, replay
        count = round(len(sft) * fraction / (1.0 - fraction))
        g = torch.Generator().manual_seed(seed)
        rounds = -(-count // len(replay)) if count else 0
        order = [torch.randperm(len(replay), generator=g) for _ in range(rounds)]
        self.replay_index: list[int] = torch.cat(order)[:count].tolist() if order else []
        self.repeats = max(rounds - 1, 0)  # > 0: fewer windows than asked for, some are used more than once

    def __len__(self) -> int:
        return len(self.sft) + len(self.replay_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        n = len(self.sft)
        return self.sft[i] if i < n else self.replay[self.replay_index[i - n]]
