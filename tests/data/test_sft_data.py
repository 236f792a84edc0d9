"""SFT data: chat JSONL validation and prompt-loss masking."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.data.sft import SFTDataset, encode_conversation, read_chat_jsonl
from lmforge.data.tokenizer import DEFAULT_CHAT_TEMPLATE, train_bpe_tokenizer
from lmforge.errors import LmforgeError
from lmforge.train.objectives import IGNORE_INDEX, token_cross_entropy

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5"}, {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "4 + 4 = 8"}]


@pytest.fixture(scope="module")
def tok():
    text = ["What is 2 + 3? And 4 + 4? Be brief. assistant user system"] * 50
    return train_bpe_tokenizer(text, vocab_size=300, chat_template=DEFAULT_CHAT_TEMPLATE)


def test_labels_cover_exactly_the_assistant_turns(tok):
    item = encode_conversation(tok, CHAT)
    ids, labels = item["input_ids"], item["labels"]
    full = tok.apply_chat_template(CHAT)
    assert ids.tolist() == full[:-1]
    targets = [t for t in labels.tolist() if t != IGNORE_INDEX]
    # Hand-check: the supervised text is the two answers, each with its end-of-turn marker.
    assert tok.decode(targets, skip_special_tokens=False) == "2 + 3 = 5<|im_end|>4 + 4 = 8<|im_end|>"
    text_before_first_target = tok.decode(full[: labels.tolist().index(targets[0]) + 1], skip_special_tokens=False)
    assert text_before_first_target.endswith("<|im_start|>assistant\n")


def test_non_assistant_positions_do_not_affect_the_loss(tok):
    item = encode_conversation(tok, CHAT)
    labels = item["labels"][None]
    logits = torch.randn(1, labels.shape[1], tok.vocab_size)
    base = token_cross_entropy(logits, labels)
    perturbed = logits.clone()
    perturbed[labels == IGNORE_INDEX] += torch.randn_like(perturbed[labels == IGNORE_INDEX]) * 10
    assert torch.equal(token_cross_entropy(perturbed, labels), base)


def test_truncation_is_counted(tok):
    ds = SFTDataset([CHAT, CHAT[:3]], tok, max_len=40)
    assert ds.truncated >= 1 and all(len(it["input_ids"]) <= 40 for it in ds.items)
    dropped = SFTDataset([CHAT, CHAT[:3]], tok, max_len=40, truncate=False)
    assert dropped.dropped >= 1 and len(dropped) == 2 - dropped.dropped


@pytest.mark.parametrize("record, match", [
    ({"messages": [{"role": "robot", "content": "x"}]}, r"c.jsonl:2: message 0 has role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "needs string 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"turns": []}, "record has no 'messages' field"),
])
def test_bad_records_name_file_and_line(tmp_path, record, match):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(LmforgeError, match=match):
        read_chat_jsonl(f)


def test_missing_file(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        read_chat_jsonl(tmp_path / "none.jsonl")
