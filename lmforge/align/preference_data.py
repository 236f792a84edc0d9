"""Preference data: JSONL pairs ``{"prompt", "chosen", "rejected"}`` -> token ids with completion-only labels.

Two record formats, as in TRL:

* plain text: all three fields are strings; the prompt is encoded with the tokenizer's special tokens
  (e.g. BOS), each completion without, and EOS is appended so the model learns to stop.
* chat: ``prompt`` is a message list (the conversation so far) and ``chosen``/``rejected`` are message
  lists holding the answer (usually one assistant message). A string in a chat record is shorthand for
  one user message (prompt) or one assistant message (completion). Rendering uses the chat template.

Labels are -100 everywhere except on the completion's tokens, so losses compare only what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import torch

from lmforge.data.chat import Messages, validate_messages
from lmforge.data.sft import IGNORE_INDEX, SequenceTooLong
from lmforge.errors import LmforgeError
from lmforge.io import iter_jsonl

Text = Union[str, Messages]
FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One preference: a prompt and two completions, the first preferred. ``source`` is ``file:line``."""

    prompt: Text
    chosen: Text
    rejected: Text
    source: str = ""

    @property
    def is_chat(self) -> bool:
        return any(isinstance(x, list) for x in (self.prompt, self.chosen, self.rejected))


# ---- reading -------------------------------------------------------------------------------------
def _check_field(value: Any, field: str, where: str) -> Text:
    if isinstance(value, str):
        # An empty prompt is legal (unconditional pairs); an empty completion gives nothing to compare.
        if field != "prompt" and not value.strip():
            raise LmforgeError(f"{where}: '{field}' is empty")
        return value
    if not isinstance(value, list):
        raise LmforgeError(f"{where}: '{field}' must be a string or a list of messages, got {type(value).__name__}")
    return validate_messages(value, where, field=field, ends=None if field == "prompt" else "answer")


def read_preference_jsonl(path: str | Path) -> list[PreferencePair]:
    """Pairs from a JSONL file, each record validated; a problem raises LmforgeError naming ``file:line``
    and the field. Blank lines are skipped; extra fields (ids, scores) are ignored."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"preference data file {path} does not exist")
    pairs = []
    for where, record in iter_jsonl(path):
        if not isinstance(record, dict):
            raise LmforgeError(f"{where}: record must be a JSON object, got {type(record).__name__}")
        for field in FIELDS:
            if field not in record:
                raise LmforgeError(f"{where}: record has no '{field}' field")
        values = [_check_field(record[f], f, where) for f in FIELDS]
        pair = PreferencePair(*values, source=where)
        if pair.chosen == pair.rejected:
            raise LmforgeError(f"{where}: 'chosen' and 'rejected' are identical")
        pairs.append(pair)
    if not pairs:
        raise LmforgeError(f"{path} holds no preference pairs")
    return pairs


# ---- encoding ------------------------------------------------------------------------------------
def _as_messages(x: Text, role: str) -> Messages:
    return [{"role": role, "content": x}] if isinstance(x, str) else list(x)


def _encode_text(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    # Encoded separately (as TRL does) so the prompt/completion boundary is a token boundary even when
    # BPE would merge across it; the model sees the same split at generation time.
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    ids = prompt_ids + tokenizer.encode(completion, add_special_tokens=False)
    eos = getattr(tokenizer, "eos_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, len(prompt_ids)


def _encode_chat(tokenizer, prompt: Messages, completion: Messages) -> tuple[list[int], list[int]]:
    """Ids of the whole chat and a per-token mask of the completion's assistant tokens."""
    ids, mask = tokenizer.apply_chat_template(prompt + completion, add_generation_prompt=False, tokenize=True,
                                              return_assistant_mask=True)
    if len(ids) != len(mask):
        raise LmforgeError(f"chat template returned {len(ids)} ids but an assistant mask of {len(mask)}")
    # Assistant turns inside the prompt are history, not the answer: only tokens after the prompt count.
    # The prompt rendered with the generation prompt must be a prefix (templates that render turns by
    # concatenation); the bare prompt is the fallback for templates whose generation prompt differs.
    boundary = None
    for gen_prompt in (True, False):
        prompt_ids, _ = tokenizer.apply_chat_template(prompt, add_generation_prompt=gen_prompt, tokenize=True,
                                                      return_assistant_mask=True)
        if list(ids[:len(prompt_ids)]) == list(prompt_ids):
            boundary = len(prompt_ids)
            break
    if boundary is None:
        raise LmforgeError("the chat template does not render the prompt as a prefix of prompt + completion, "
                           "so the completion's tokens cannot be located")
    mask = [int(bool(m)) if t >= boundary else 0 for t, m in enumerate(mask)]
    return list(ids), mask


def _to_item(ids: list[int], target: list[int], max_len: int | None, which: str, source: str) -> dict[str, torch.Tensor]:
    """Shift to (input_ids, labels) like SFT: labels[t] = ids[t+1] where that target is a completion token."""
    ids_t = torch.tensor(ids, dtype=torch.long)
    keep = torch.tensor(target, dtype=torch.bool)
    labels = torch.where(keep[1:], ids_t[1:], torch.full_like(ids_t[1:], IGNORE_INDEX))
    input_ids = ids_t[:-1]
    if max_len is not None and len(input_ids) > max_len:
        # Cut the completion's tail, never the prompt's head: the prompt is what the answer is about.
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    if not (labels != IGNORE_INDEX).any():
        where = f"{source}: " if source else ""
        raise SequenceTooLong(f"{where}'{which}' has no completion token within max_len={max_len} "
                              f"(the prompt is too long or the completion is empty)")
    return {"input_ids": input_ids, "labels": labels}


def encode_pair(tokenizer, pair: PreferencePair, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels`` (1-D long).

    Labels are aligned with input ids (labels[t] is the target at position t) and -100 on prompt
    tokens, so ``sequence_logprobs(model(input_ids).logits, labels)`` is log pi(completion | prompt).
    Sequences longer than ``max_len`` input positions lose the completion's tail; if no completion
    token is left, ``SequenceTooLong`` is raised (the caller drops the pair and counts it).
    """
    out: dict[str, torch.Tensor] = {}
    for which, completion in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if pair.is_chat:
            ids, target = _encode_chat(tokenizer, _as_messages(pair.prompt, "user"),
                                       _as_messages(completion, "assistant"))
        else:
            ids, n_prompt = _encode_text(tokenizer, pair.prompt, completion)
            target = [0] * n_prompt + [1] * (len(ids) - n_prompt)
        if len(ids) < 2:
            raise LmforgeError(f"{pair.source or 'pair'}: '{which}' encodes to fewer than two tokens")
        item = _to_item(ids, target, max_len, which, pair.source)
        out[f"{which}_input_ids"], out[f"{which}_labels"] = item["input_ids"], item["labels"]
    return out


def collate_pairs(items: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad B encoded pairs into one ``[2B, T]`` batch: rows ``0..B-1`` chosen, ``B..2B-1`` rejected,
    so policy and reference each need a single forward pass. Adds ``attention_mask``; labels -100 on padding."""
    if not items:
        raise LmforgeError("cannot collate an empty list of preference pairs")
    seqs = [(it["chosen_input_ids"], it["chosen_labels"]) for it in items]
    seqs += [(it["rejected_input_ids"], it["rejected_labels"]) for it in items]
    longest = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, (ids, lab) in enumerate(seqs):
        input_ids[row, :len(ids)] = ids
        labels[row, :len(ids)] = lab
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


__all__ = ["PreferencePair", "collate_pairs", "encode_pair", "read_preference_jsonl"]
