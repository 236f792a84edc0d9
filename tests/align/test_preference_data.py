"""Preference JSONL validation (errors name file:line and field) and completion-only labels."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.align.losses import sequence_logprobs
from lmforge.align.preference_data import PreferencePair, collate_pairs, encode_pair, read_preference_jsonl
from lmforge.data.sft import SequenceTooLong
from lmforge.errors import LmforgeError
from lmforge.data.sft import IGNORE_INDEX


class ByteTokenizer:
    """One id per byte; BOS=1 added by encode(add_special_tokens=True), EOS=2. The chat template is
    BOS, then per message "role:" + content + EOS, the assistant mask covering content and EOS; the
    generation prompt is "assistant:"."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, add_special_tokens=True):
        return ([self.bos_id] if add_special_tokens else []) + list(text.encode())

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, return_assistant_mask=False):
        ids, mask = [self.bos_id], [0]
        for m in messages:
            head, body = list(f"{m['role']}:".encode()), [*m["content"].encode(), self.eos_id]
            ids += head + body
            mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
        if add_generation_prompt:
            ids += list(b"assistant:")
            mask += [0] * len("assistant:")
        return (ids, mask) if return_assistant_mask else ids


TOK = ByteTokenizer()


def _write(tmp_path, records):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def _targets(labels):
    return bytes(t for t in labels.tolist() if t not in (IGNORE_INDEX, TOK.eos_id)).decode()


GOOD = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
CHAT = {"prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}


def test_reads_text_and_chat_records(tmp_path):
    pairs = read_preference_jsonl(_write(tmp_path, [GOOD, "", CHAT]))
    assert [p.is_chat for p in pairs] == [False, True]
    assert pairs[1].source.endswith("prefs.jsonl:3")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "a"}, ":2: record has no 'rejected' field"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, ":2: 'chosen' is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": ""}]},
     ":2: 'rejected' has an empty assistant message"),
    ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"},
     ":2: 'prompt' message 0 has role 'robot'"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     ":2: 'chosen' must end with an assistant message"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, ":2: 'chosen' must be a string or a list"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, ":2: 'chosen' and 'rejected' are identical"),
    ("[1, 2]", ":2: record must be a JSON object"),
    ("{not json", ":2: not valid JSON"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    path = _write(tmp_path, [GOOD, record])
    with pytest.raises(LmforgeError) as err:
        read_preference_jsonl(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        read_preference_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LmforgeError, match="no preference pairs"):
        read_preference_jsonl(tmp_path / "empty.jsonl")


def test_encode_text_pair_labels_only_the_completion_and_eos():
    item = encode_pair(TOK, PreferencePair("2+2=", " four", " five"))
    ids = [1, *b"2+2= four", 2]
    assert item["chosen_input_ids"].tolist() == ids[:-1]
    assert item["chosen_labels"].tolist() == [IGNORE_INDEX] * 4 + [*b" four", 2]
    assert _targets(item["rejected_labels"]) == " five"


def test_encode_chat_pair_masks_prompt_history_and_generation_prompt():
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old"},
              {"role": "user", "content": "2+2?"}]
    item = encode_pair(TOK, PreferencePair(prompt, [{"role": "assistant", "content": "4"}], "5"))
    # The earlier assistant turn is history, not a target; only the answer and its EOS are.
    assert item["chosen_labels"][item["chosen_labels"] != IGNORE_INDEX].tolist() == [ord("4"), 2]
    assert item["rejected_labels"][item["rejected_labels"] != IGNORE_INDEX].tolist() == [ord("5"), 2]
    full, _ = TOK.apply_chat_template([*prompt, {"role": "assistant", "content": "4"}], return_assistant_mask=True)
    assert item["chosen_input_ids"].tolist() == full[:-1]


def test_max_len_cuts_the_completion_and_errors_when_nothing_is_left():
    item = encode_pair(TOK, PreferencePair("ab", "cdefgh", "xy"), max_len=5)
    assert len(item["chosen_input_ids"]) == 5 and _targets(item["chosen_labels"]) == "cde"
    assert item["rejected_labels"].tolist()[-3:] == [*b"xy", 2]  # fits: untouched
    with pytest.raises(SequenceTooLong, match="'chosen' has no completion token"):
        encode_pair(TOK, PreferencePair("a long prompt", "c", "d", source="f.jsonl:7"), max_len=4)


def test_collate_stacks_chosen_then_rejected_and_logprobs_cover_completions():
    items = [encode_pair(TOK, PreferencePair("p", "yes", "no")), encode_pair(TOK, PreferencePair("q", "a", "bb"))]
    batch = collate_pairs(items, TOK.pad_id)
    assert batch["input_ids"].shape == (4, 5)
    assert [_targets(row) for row in batch["labels"]] == ["yes", "a", "no", "bb"]
    assert batch["attention_mask"].sum(1).tolist() == [5, 3, 4, 4]
    logits = torch.zeros(4, 5, 256)  # uniform model: log p = -log 256 per completion token (incl. EOS)
    want = torch.tensor([4, 2, 3, 3]) * -torch.log(torch.tensor(256.0))
    assert torch.allclose(sequence_logprobs(logits, batch["labels"]), want)


def test_real_tokenizer_chat_and_text_pairs_target_the_answer_and_its_end_marker():
    from lmforge.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["what is two plus two? four, not five."] * 20, vocab_size=300)

    def answer(labels):
        return tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX], skip_special_tokens=False)

    chat = encode_pair(tok, PreferencePair([{"role": "user", "content": "What is 2+2?"}], "four", "five"))
    assert answer(chat["chosen_labels"]) == "four<|im_end|>" and answer(chat["rejected_labels"]) == "five<|im_end|>"
    text = encode_pair(tok, PreferencePair("What is 2+2?", " four", " five"))
    assert answer(text["chosen_labels"]) == " four<|endoftext|>"
