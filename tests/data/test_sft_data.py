"""SFT data: chat JSONL validation, prompt-loss masking, length handling and padding."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.sft import (IGNORE_INDEX, ReplayMixture, SequenceTooLong, SFTDataset, encode_conversation, pad_collate,
                              read_chat_jsonl)
from lmforge.errors import LmforgeError
from lmforge.train.objectives import token_cross_entropy

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5"}, {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "4 + 4 = 8"}]


class CharChatTokenizer:
    """A chat template with a known mask: BOS, then per message "role:" + content + EOS, one id per byte;
    the assistant mask covers each assistant content and its EOS."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 256

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, return_assistant_mask=True):
        ids, mask = [self.bos_id], [0]
        for m in messages:
            head, body = list(f"{m['role']}:".encode()), [*m["content"].encode(), self.eos_id]
            ids += head + body
            mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
        return ids, mask


TOK = CharChatTokenizer()


def test_labels_are_ignored_exactly_outside_assistant_targets():
    item = encode_conversation(TOK, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    ids = [1, *b"user:hi", 2, *b"assistant:yo", 2]
    assert item["input_ids"].tolist() == ids[:-1]
    # Hand-built: only the positions whose next token is "y", "o" or the final EOS are supervised.
    first = len(ids) - 4  # the ":" before "yo"
    assert item["labels"].tolist() == [IGNORE_INDEX] * first + [ord("y"), ord("o"), 2]


def test_labels_follow_the_mask_in_a_multi_turn_chat():
    ids, mask = TOK.apply_chat_template(CHAT)
    labels = encode_conversation(TOK, CHAT)["labels"].tolist()
    assert labels == [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    assert bytes(t for t in labels if t not in (IGNORE_INDEX, 2)).decode() == "2 + 3 = 54 + 4 = 8"


def test_non_assistant_positions_do_not_affect_the_loss():
    labels = pad_collate([encode_conversation(TOK, CHAT), encode_conversation(TOK, CHAT[:3])], TOK.pad_id)["labels"]
    logits = torch.randn(*labels.shape, TOK.vocab_size)
    base = token_cross_entropy(logits, labels)
    perturbed = logits.clone()
    ignored = labels == IGNORE_INDEX
    perturbed[ignored] += torch.randn_like(perturbed[ignored]) * 10
    assert torch.equal(token_cross_entropy(perturbed, labels), base)
    flat = lambda x: F.cross_entropy(x.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)  # noqa: E731
    assert torch.allclose(flat(perturbed), flat(logits))
    perturbed[~ignored] += 1e-2 * torch.randn_like(perturbed[~ignored])  # sanity: target positions do count
    assert not torch.equal(token_cross_entropy(perturbed, labels), base)


def test_too_long_conversations_are_truncated_dropped_or_refused():
    n = len(encode_conversation(TOK, CHAT)["input_ids"])
    cut = encode_conversation(TOK, CHAT, max_len=n - 5)
    assert len(cut["input_ids"]) == len(cut["labels"]) == n - 5
    assert cut["labels"].tolist() == encode_conversation(TOK, CHAT)["labels"][: n - 5].tolist()  # from the right
    with pytest.raises(SequenceTooLong, match=f"{n} tokens, longer than max_len={n - 5}"):
        encode_conversation(TOK, CHAT, max_len=n - 5, truncate=False)

    short = CHAT[:3]
    ds = SFTDataset([CHAT, short], TOK, max_len=n - 5)
    assert (len(ds), ds.truncated, ds.dropped) == (2, 1, 0)
    for mode in ("drop", False):
        dropped = SFTDataset([CHAT, short], TOK, max_len=n - 5, truncate=mode)
        assert (len(dropped), dropped.truncated, dropped.dropped) == (1, 0, 1)
    with pytest.raises(SequenceTooLong, match="conversation 0 is"):
        SFTDataset([CHAT, short], TOK, max_len=n - 5, truncate="error")
    # Cut before the first answer: nothing left to learn, so dropped (and counted), never kept silently.
    tiny = [{"role": "assistant", "content": "ok"}]  # 13 input positions, answer starts at 10
    ds = SFTDataset([CHAT, tiny], TOK, max_len=12)
    assert (len(ds), ds.truncated, ds.dropped) == (1, 2, 1) and (ds[0]["labels"] != IGNORE_INDEX).sum() == 2
    with pytest.raises(LmforgeError, match=r"no usable conversations \(dropped 2\)"):
        SFTDataset([CHAT, short], TOK, max_len=12)


def test_padding_collate_masks():
    a, b = encode_conversation(TOK, CHAT), encode_conversation(TOK, CHAT[:3])
    batch = pad_collate([b, a], pad_id=TOK.pad_id)
    T = len(a["input_ids"])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(v.shape == (2, T) and v.dtype == torch.long for v in batch.values())
    n = len(b["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (T - n) and batch["attention_mask"][1].all()
    assert (batch["input_ids"][0, n:] == TOK.pad_id).all() and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert torch.equal(batch["input_ids"][0, :n], b["input_ids"]) and torch.equal(batch["labels"][1], a["labels"])


# ---- reading and validation -------------------------------------------------------------------------
@pytest.mark.parametrize("line, match", [
    ({"messages": [{"role": "robot", "content": "x"}]}, r"c.jsonl:2: message 0 has role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     r"c.jsonl:2: message 0 \(user\) needs string 'content', got int"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"c.jsonl:2: no assistant message"),
    ({"turns": []}, r"c.jsonl:2: record has no 'messages' field"),
    ({"messages": []}, r"c.jsonl:2: 'messages' must be a non-empty list"),
    ("{not json", r"c.jsonl:2: not valid JSON"),
])
def test_bad_records_name_file_and_line(tmp_path, line, match):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": CHAT}) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(LmforgeError, match=match):
        read_chat_jsonl(f)


def test_reads_valid_file_and_reports_missing_or_empty(tmp_path):
    f = tmp_path / "ok.jsonl"
    f.write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"messages": CHAT[:3]}) + "\n")
    assert read_chat_jsonl(f) == [CHAT, CHAT[:3]]
    with pytest.raises(LmforgeError, match="none.jsonl does not exist"):
        read_chat_jsonl(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LmforgeError, match="holds no conversations"):
        read_chat_jsonl(tmp_path / "empty.jsonl")


def test_real_bpe_tokenizer_supervises_only_the_answers():
    """Integration with the project tokenizer's ChatML template and its {% generation %} mask."""
    from lmforge.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["What is 2 + 3? And 4 + 4? Be brief. assistant user system"] * 50, vocab_size=300)
    item = encode_conversation(tok, CHAT)
    full = tok.apply_chat_template(CHAT)
    assert item["input_ids"].tolist() == full[:-1]
    targets = [t for t in item["labels"].tolist() if t != IGNORE_INDEX]
    assert tok.decode(targets, skip_special_tokens=False) == "2 + 3 = 5<|im_end|>4 + 4 = 8<|im_end|>"


def test_replay_mixture_has_the_asked_share_without_repeats_until_exhausted():
    sft = [{"input_ids": torch.tensor([i]), "labels": torch.tensor([IGNORE_INDEX])} for i in range(30)]
    windows = [{"input_ids": torch.tensor([100 + i]), "labels": torch.tensor([i])} for i in range(50)]
    mix = ReplayMixture(sft, windows, fraction=0.25, seed=3)
    assert len(mix) == 40 and len(mix.replay_index) == 10 and mix.repeats == 0
    assert [mix[i] for i in range(30)] == sft  # conversations first, unchanged
    replayed = [int(mix[i]["input_ids"]) - 100 for i in range(30, 40)]
    assert len(set(replayed)) == 10 and replayed != list(range(10))  # distinct, in a seeded order
    assert replayed == [int(ReplayMixture(sft, windows, 0.25, seed=3)[i]["input_ids"]) - 100 for i in range(30, 40)]
    many = ReplayMixture(sft, windows[:4], fraction=0.5, seed=0)  # 30 asked, 4 exist: each used 7 or 8 times
    assert len(many.replay_index) == 30 and many.repeats == 7 and sorted(set(many.replay_index)) == [0, 1, 2, 3]
    assert len(ReplayMixture(sft, windows, fraction=0.0)) == 30
    with pytest.raises(IndexError):
        mix[40]
    with pytest.raises(LmforgeError, match="must be in"):
        ReplayMixture(sft, windows, fraction=1.0)
    with pytest.raises(LmforgeError, match="holds no windows"):
        ReplayMixture(sft, [], fraction=0.1)
