"""Pretraining data: reading files, the token cache, packing, the split, and the step sampler."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.pretrain import PackedDataset, build_token_cache, read_documents
from lmforge.data.sampler import StepSampler
from lmforge.errors import LmforgeError

EOS = 0


class ByteTokenizer:
    """ids = bytes + 1, EOS = 0; counts how many documents it encoded."""

    eos_id, vocab_size = EOS, 257

    def __init__(self) -> None:
        self.encoded = 0

    def encode_batch(self, texts, add_special_tokens=True):
        self.encoded += len(texts)
        return [[b + 1 for b in t.encode()] for t in texts]


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


def test_reads_txt_md_jsonl_parquet(corpus):
    assert list(read_documents([corpus])) == ["alpha document", "beta", "gamma one", "gamma two", "delta", "epsilon"]


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(LmforgeError, match=r"x.jsonl:2: not valid JSON"):
        list(read_documents([f]))
    f.write_text('{"body": "no text field"}\n')
    with pytest.raises(LmforgeError, match=r"x.jsonl:1: record has no 'text' field"):
        list(read_documents([f]))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(LmforgeError, match="nope.txt does not exist"):
        list(read_documents([tmp_path / "nope.txt"]))


def test_cache_is_reused_and_rebuilt_on_change(corpus, tmp_path):
    tok = ByteTokenizer()
    first = build_token_cache([corpus], tok, tmp_path / "cache")
    assert tok.encoded == 6
    again = build_token_cache([corpus], tok, tmp_path / "cache")
    assert tok.encoded == 6 and again.train.path == first.train.path  # no re-tokenisation
    (corpus / "b.md").write_text("beta, edited")
    build_token_cache([corpus], tok, tmp_path / "cache")
    assert tok.encoded == 12


def test_truncated_cache_is_rebuilt(corpus, tmp_path):
    tok = ByteTokenizer()
    caches = build_token_cache([corpus], tok, tmp_path / "cache")
    data = caches.train.path.read_bytes()
    caches.train.path.write_bytes(data[:-4])
    rebuilt = build_token_cache([corpus], tok, tmp_path / "cache")
    assert tok.encoded == 12 and rebuilt.train.path.stat().st_size == len(data)


def test_stream_has_eos_between_documents_and_packing_is_exact(corpus, tmp_path):
    caches = build_token_cache([corpus], ByteTokenizer(), tmp_path / "cache")
    stream = caches.train.tokens()
    docs = list(read_documents([corpus]))
    expected = np.concatenate([np.array([b + 1 for b in d.encode()] + [EOS]) for d in docs])
    assert np.array_equal(np.asarray(stream), expected)
    ds = PackedDataset(caches.train, seq_len=8)
    assert len(ds) == (len(expected) - 1) // 8
    rebuilt = np.concatenate([ds[i]["input_ids"].numpy() for i in range(len(ds))])
    assert np.array_equal(rebuilt, expected[: len(rebuilt)])
    for i in range(len(ds)):
        assert np.array_equal(ds[i]["labels"].numpy(), expected[i * 8 + 1: i * 8 + 9])


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

    assert docs(a.train).isdisjoint(docs(a.val))


def test_sequence_longer_than_corpus(tmp_path, corpus):
    caches = build_token_cache([corpus], ByteTokenizer(), tmp_path / "cache")
    with pytest.raises(LmforgeError, match="cannot fill one sequence"):
        PackedDataset(caches.train, seq_len=10_000)


def test_sampler_is_a_pure_function_of_step():
    s = StepSampler(10, batch_size=3, seed=7)
    assert s.steps_per_epoch == 3
    assert s.indices(4) == StepSampler(10, 3, seed=7).indices(4)
    epoch0 = sum((s.indices(k) for k in range(3)), [])
    assert len(set(epoch0)) == 9  # no repeats within an epoch (one item dropped)
    assert s.indices(3) != s.indices(0) or s.indices(4) != s.indices(1)  # reshuffled next epoch


def test_sampler_ranks_partition_the_global_batch():
    single = StepSampler(40, batch_size=2, seed=1)
    r0, r1 = StepSampler(40, 2, seed=1, rank=0, world_size=2), StepSampler(40, 2, seed=1, rank=1, world_size=2)
    for step in range(12):  # crosses epochs
        assert r0.indices(step) + r1.indices(step) == single.indices(2 * step) + single.indices(2 * step + 1)
