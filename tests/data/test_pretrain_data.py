"""Pretraining data: reading files, the token cache, packing, the split, and the step sampler."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmforge.data import pretrain
from lmforge.data.pretrain import PackedDataset, build_token_cache, iter_cuts, read_documents
from lmforge.data.sampler import StepSampler
from lmforge.errors import ConfigError, LmforgeError

EOS = 0


class ByteTokenizer:
    """ids = bytes + 1, EOS = 0; counts how many documents went through encode_batch."""

    eos_id, bos_id, pad_id = EOS, EOS, EOS

    def __init__(self, vocab_size: int = 257) -> None:
        self.vocab_size = vocab_size
        self.encoded = 0

    def encode(self, text, add_special_tokens=True):
        return [b + 1 for b in text.encode()]

    def encode_batch(self, texts, add_special_tokens=True):
        self.encoded += len(texts)
        return [self.encode(t) for t in texts]


def expected_stream(docs: list[str]) -> np.ndarray:
    return np.concatenate([np.array([b + 1 for b in d.encode()] + [EOS]) for d in docs])


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("alpha document")
    (d / "b.md").write_text("beta")
    (d / "c.jsonl").write_text(json.dumps({"text": "gamma one"}) + "\n\n" + json.dumps({"text": "gamma two"}) + "\n")
    pq.write_table(pa.table({"text": ["delta", "epsilon"]}), d / "d.parquet")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d


# ---- reading ----------------------------------------------------------------------------------------
def test_reads_txt_md_jsonl_parquet(corpus):
    assert list(read_documents([corpus])) == ["alpha document", "beta", "gamma one", "gamma two", "delta", "epsilon"]
    assert list(read_documents([corpus], glob="*.jsonl")) == ["gamma one", "gamma two"]


def test_jsonl_text_field_is_configurable(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"body": "one"}) + "\n" + json.dumps({"body": ""}) + "\n")
    assert list(read_documents([f], text_field="body")) == ["one"]  # empty documents are skipped


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(LmforgeError, match=r"x.jsonl:2: not valid JSON"):
        list(read_documents([f]))
    f.write_text('{"body": "no text field"}\n')
    with pytest.raises(LmforgeError, match=r"x.jsonl:1: record has no 'text' field"):
        list(read_documents([f]))
    f.write_text('{"text": 5}\n')
    with pytest.raises(LmforgeError, match=r"x.jsonl:1: field 'text' must be a string"):
        list(read_documents([f]))
    f.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(LmforgeError, match=r"x.jsonl:2: not valid UTF-8"):
        list(read_documents([f]))


def test_text_file_that_is_not_utf8_names_file_and_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xc3\xa9 ok \xff\xfe tail")  # valid UTF-8 up to byte 9
    with pytest.raises(LmforgeError, match=r"bad.txt: not valid UTF-8 at byte offset 9"):
        list(read_documents([bad]))
    with pytest.raises(LmforgeError, match=r"bad.txt: not valid UTF-8 at byte offset 9"):
        build_token_cache([tmp_path], ByteTokenizer(), tmp_path / "cache")
    assert list(read_documents([bad], errors="replace")) == ["café ok \ufffd\ufffd tail"]  # only when asked
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"MZ\x00\x00\x03")  # valid UTF-8, but NUL bytes: an executable renamed .txt
    with pytest.raises(LmforgeError, match=r"blob.txt: NUL byte at byte offset 2"):
        list(read_documents([binary]))
    with pytest.raises(LmforgeError, match="errors must be one of strict, replace"):
        build_token_cache([bad], ByteTokenizer(), tmp_path / "cache", errors="ignore")


def test_jsonl_errors_option_and_file_offset(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "a\xffb"}\n')
    with pytest.raises(LmforgeError, match=r"x.jsonl:2: not valid UTF-8 .*byte offset 26 in the file"):
        list(read_documents([f]))
    assert list(read_documents([f], errors="replace")) == ["ok", "a\ufffdb"]
    replaced = build_token_cache([f], ByteTokenizer(), tmp_path / "cache", errors="replace")
    assert replaced.train.num_docs == 2  # and a cache of its own: not shared with the strict reading
    assert "errors" in json.loads(next((tmp_path / "cache").glob("*.json")).read_text())["key"]


def test_bad_parquet_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(LmforgeError, match=r"a.parquet: no column 'text' \(columns: body\)"):
        list(read_documents([tmp_path / "a.parquet"]))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    with pytest.raises(LmforgeError, match=r"b.parquet: column 'text' has type int64"):
        list(read_documents([tmp_path / "b.parquet"]))


def test_missing_path_is_named(tmp_path, corpus):
    with pytest.raises(LmforgeError, match="nope.txt does not exist"):
        list(read_documents([corpus, tmp_path / "nope.txt"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="empty has no readable files"):
        build_token_cache([tmp_path / "empty"], ByteTokenizer(), tmp_path / "cache")


# ---- token cache ------------------------------------------------------------------------------------
def test_cache_is_reused_and_rebuilt_on_change(corpus, tmp_path, caplog):
    tok = ByteTokenizer()
    first = build_token_cache([corpus], tok, tmp_path / "cache")
    assert tok.encoded == 6 and not first.reused and first.train.dtype == "uint16"
    meta = json.loads(first.train.path.with_name(first.train.path.name.split(".")[0] + ".json").read_text())
    assert meta["parts"]["train"] == {"num_tokens": first.train.num_tokens, "num_docs": 6, "dtype": "uint16"}
    again = build_token_cache([corpus], tok, tmp_path / "cache")
    assert tok.encoded == 6 and again.reused and again.train.path == first.train.path  # no re-tokenization
    (corpus / "b.md").write_text("beta, edited")
    with caplog.at_level(logging.WARNING, logger="lmforge.data.pretrain"):
        edited = build_token_cache([corpus], tok, tmp_path / "cache")
    assert tok.encoded == 12 and not edited.reused and "sources changed" in caplog.text
    assert edited.train.path == first.train.path  # rebuilt in place: no stale copy left behind
    assert np.array_equal(edited.train.tokens(), expected_stream(list(read_documents([corpus]))))
    other = ByteTokenizer(vocab_size=70_000)  # a different tokenizer is a different cache
    wide = build_token_cache([corpus], other, tmp_path / "cache")
    assert other.encoded == 6 and wide.train.dtype == "uint32" and wide.train.path != first.train.path
    assert np.array_equal(wide.train.tokens(), edited.train.tokens())


def test_truncated_cache_is_rebuilt(corpus, tmp_path, caplog):
    tok = ByteTokenizer()
    caches = build_token_cache([corpus], tok, tmp_path / "cache")
    data = caches.train.path.read_bytes()
    caches.train.path.write_bytes(data[:-4])
    with pytest.raises(LmforgeError, match="expected"):  # a stale handle fails clearly, not with an mmap error
        caches.train.tokens()
    with caplog.at_level(logging.WARNING, logger="lmforge.data.pretrain"):
        rebuilt = build_token_cache([corpus], tok, tmp_path / "cache")
    assert tok.encoded == 12 and rebuilt.train.path.read_bytes() == data
    assert "train.bin is" in caplog.text and "re-tokenizing" in caplog.text


def test_stream_has_eos_between_documents_and_packing_is_exact(corpus, tmp_path):
    caches = build_token_cache([corpus], ByteTokenizer(), tmp_path / "cache")
    stream = caches.train.tokens()
    expected = expected_stream(list(read_documents([corpus])))
    assert np.array_equal(np.asarray(stream), expected)
    assert int((expected == EOS).sum()) == caches.train.num_docs == 6
    ds = PackedDataset(caches.train, seq_len=8)
    assert len(ds) == (len(expected) - 1) // 8
    rebuilt = np.concatenate([ds[i]["input_ids"].numpy() for i in range(len(ds))])
    assert np.array_equal(rebuilt, expected[: len(rebuilt)])
    for i in range(len(ds)):
        assert ds[i]["input_ids"].dtype == ds[i]["labels"].dtype == torch.long
        assert np.array_equal(ds[i]["labels"].numpy(), expected[i * 8 + 1: i * 8 + 9])
    with pytest.raises(IndexError):
        ds[len(ds)]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers get a copy without the memory map
    assert clone._tokens is None and np.array_equal(clone[1]["labels"].numpy(), ds[1]["labels"].numpy())


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(200):
        (d / f"{i:03d}.txt").write_text(f"document number {i}")
    a = build_token_cache([d], ByteTokenizer(), tmp_path / "c1", val_fraction=0.1, seed=3)
    b = build_token_cache([d], ByteTokenizer(), tmp_path / "c2", val_fraction=0.1, seed=3)
    assert np.array_equal(np.asarray(a.val.tokens()), np.asarray(b.val.tokens()))
    assert 5 <= a.val.num_docs <= 40 and a.train.num_docs + a.val.num_docs == 200

    def docs(cache):
        raw = bytes(int(t) - 1 for t in cache.tokens() if t != EOS)
        return set(raw.decode().replace("document number ", " ").split())

    assert docs(a.train).isdisjoint(docs(a.val)) and len(docs(a.train) | docs(a.val)) == 200
    c = build_token_cache([d], ByteTokenizer(), tmp_path / "c1", val_fraction=0.1, seed=4)
    assert docs(c.val) != docs(a.val)  # another seed, another split (and another cache)
    limited = build_token_cache([d], ByteTokenizer(), tmp_path / "c3", max_docs=10)
    assert limited.train.num_docs == 10 and limited.val is None


def test_tiny_corpus_still_gets_a_validation_document(corpus, tmp_path):
    caches = build_token_cache([corpus], ByteTokenizer(), tmp_path / "cache", val_fraction=0.01)
    assert caches.val is not None and caches.train.num_docs + caches.val.num_docs == 6


def test_explicit_validation_files(corpus, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text("held out")
    caches = build_token_cache([corpus], ByteTokenizer(), tmp_path / "cache", val_paths=[val])
    assert caches.train.num_docs == 6 and np.array_equal(caches.val.tokens(), expected_stream(["held out"]))


# ---- long documents -----------------------------------------------------------------------------
def test_cuts_are_bounded_and_prefer_word_boundaries():
    text = "alpha beta\ngamma  delta 12345 (x) " * 40
    cuts = list(iter_cuts(text, 50))
    assert "".join(text[a:b] for a, b in cuts) == text and cuts[0][0] == 0 and cuts[-1][1] == len(text)
    assert all(0 < b - a <= 50 for a, b in cuts)
    assert all(text[b] == " " and not text[b - 1].isspace() and not text[b + 1].isspace() for _, b in cuts[:-1])
    blob = "x" * 120  # no safe place at all: cut at the limit
    assert list(iter_cuts(blob, 50)) == [(0, 50), (50, 100), (100, 120)]
    assert list(iter_cuts("short", 50)) == [(0, 5)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from lmforge.data.tokenizer import train_bpe_tokenizer

    lines = [f"def f_{i}(x):\n    return x * {i} + {i * 7}  # note: über 日本 ok\n" for i in range(200)]
    return train_bpe_tokenizer(lines, vocab_size=400)


def test_long_document_is_tokenized_in_pieces_with_the_same_tokens(bpe, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "PIECE_CHARS", 64)
    monkeypatch.setattr(pretrain, "CHUNK_CHARS", 300)  # flushes fall inside the long document too
    long_doc = "".join(f"def f_{i}(x):\n    return x * {i} + {i * 7}  # note: über 日本 ok\n" for i in range(150))
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": long_doc}) + "\n" + json.dumps({"text": "tail doc"}) + "\n")
    caches = build_token_cache([f], bpe, tmp_path / "cache")
    whole = [*bpe.encode(long_doc, add_special_tokens=False), bpe.eos_id,
             *bpe.encode("tail doc", add_special_tokens=False), bpe.eos_id]
    assert caches.train.num_docs == 2 and caches.train.tokens().tolist() == whole


_MEASURE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from lmforge.data import pretrain
    from lmforge.data.tokenizer import load_tokenizer

    tok, data, cache = load_tokenizer(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    pretrain.CHUNK_CHARS = 1 << 20  # the same batch budget for both layouts, small enough to be quick
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    def kib(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
    before = kib("VmRSS")
    pretrain.build_token_cache([data], tok, cache)
    print(json.dumps({"peak_kib": kib("VmHWM") - before}))
""")


def _peak_kib(tok_dir, data, cache) -> int:
    env = {**os.environ, "RAYON_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tok_dir), str(data), str(cache)], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset")
def test_tokenizing_a_long_line_takes_no_more_memory_than_many_lines(bpe, tmp_path):
    # 3 MB of text as one JSONL line vs the same bytes over 1,000 lines: memory must not follow line length
    # (before chunking, the single line took ~10x as much: the tokenizer's working set grows with input length).
    bpe.save(tmp_path / "tok")
    text = " ".join(f"word{i % 97} x{i % 13}." for i in range(300_000))[:3_000_000]
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": text}) + "\n")
    many = tmp_path / "many.jsonl"
    step = len(text) // 1000
    many.write_text("".join(json.dumps({"text": text[i:i + step]}) + "\n" for i in range(0, len(text), step)))
    single, spread = _peak_kib(tmp_path / "tok", one, tmp_path / "c1"), _peak_kib(tmp_path / "tok", many, tmp_path / "c2")
    # Holding the one document (its line, then its text) is allowed: ~3 copies of 3 MB beyond the many-line run.
    assert single <= 1.5 * spread + 3 * 3_000, (single, spread)


def test_sequence_longer_than_corpus(tmp_path, corpus):
    caches = build_token_cache([corpus], ByteTokenizer(), tmp_path / "cache")
    with pytest.raises(LmforgeError, match="cannot fill one sequence"):
        PackedDataset(caches.train, seq_len=10_000)


# ---- sampler ----------------------------------------------------------------------------------------
def test_sampler_is_a_pure_function_of_step():
    s = StepSampler(10, batch_size=3, seed=7)
    assert s.steps_per_epoch == 3 and s.epoch_of(4) == 1
    assert s.indices(4) == StepSampler(10, 3, seed=7).indices(4)  # a fresh sampler (resume) agrees
    assert StepSampler(10, 3, seed=8).indices(0) != s.indices(0)
    epoch0 = sum((s.indices(k) for k in range(3)), [])
    assert len(set(epoch0)) == 9  # no repeats within an epoch (one item dropped)
    assert sum((s.indices(k) for k in range(3, 6)), []) != epoch0  # reshuffled next epoch


def test_sampler_epoch_covers_every_item_once():
    s = StepSampler(12, batch_size=4, seed=0)
    for epoch in range(3):
        seen = sum((s.indices(epoch * 3 + k) for k in range(3)), [])
        assert sorted(seen) == list(range(12))
    keep = StepSampler(10, batch_size=4, seed=0, drop_last=False)
    assert keep.steps_per_epoch == 3
    batches = [keep.indices(k) for k in range(3)]
    assert all(len(b) == 4 for b in batches) and set(sum(batches, [])) == set(range(10))


def test_sampler_ranks_partition_the_global_batch():
    single = StepSampler(40, batch_size=4, seed=1)
    r0, r1 = StepSampler(40, 2, seed=1, rank=0, world_size=2), StepSampler(40, 2, seed=1, rank=1, world_size=2)
    assert r0.steps_per_epoch == single.steps_per_epoch == 10
    for step in range(25):  # crosses epochs
        a, b = r0.indices(step), r1.indices(step)
        assert set(a).isdisjoint(b) and a + b == single.indices(step)
    micro = StepSampler(40, batch_size=2, seed=1)  # one process, accumulation 2 = the same items
    for step in range(12):
        assert r0.indices(step) + r1.indices(step) == micro.indices(2 * step) + micro.indices(2 * step + 1)


def test_sampler_rejects_bad_geometry():
    with pytest.raises(ConfigError, match="rank=2"):
        StepSampler(10, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="cannot fill one global batch"):
        StepSampler(3, 2, seed=0, world_size=2).indices(0)
