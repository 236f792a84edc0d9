"""Pretraining data: local files -> documents -> parallel tokenization -> memory-mapped token cache -> packed sequences.

Document boundaries are EOS separators: every document is followed by the tokenizer's EOS token and the
stream is cut into fixed-length windows that may span documents (GPT-style packing; attention is not
blocked at boundaries, the EOS tells the model a new document starts).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.io import atomic_file

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".html", ".css",
                 ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".sh", ".tex"}
CACHE_VERSION = 1


# ---- reading documents ------------------------------------------------------------------------------
def expand_paths(paths: Sequence[str | Path], glob: str = "**/*") -> list[Path]:
    """Files named directly, plus the matching files under named directories (sorted: deterministic)."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.glob(glob) if f.is_file() and _readable_suffix(f))
            if not found:
                raise LmforgeError(f"data directory {p} has no readable files matching {glob!r}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise LmforgeError(f"data file {p} does not exist")
    return files


def _readable_suffix(f: Path) -> bool:
    return f.suffix in TEXT_SUFFIXES or f.suffix in (".jsonl", ".parquet")


def read_documents(paths: Sequence[str | Path], text_field: str = "text", glob: str = "**/*") -> Iterator[str]:
    """Yield documents: a text file is one document; a JSONL line or a Parquet row is one document."""
    for f in expand_paths(paths, glob):
        if f.suffix == ".jsonl":
            yield from _read_jsonl(f, text_field)
        elif f.suffix == ".parquet":
            yield from _read_parquet(f, text_field)
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise LmforgeError(f"{path}:{n}: record has no {field!r} field")
            if not isinstance(record[field], str):
                raise LmforgeError(f"{path}:{n}: field {field!r} must be a string, got {type(record[field]).__name__}")
            yield record[field]


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise LmforgeError(f"{path}: cannot read Parquet file ({e})") from None
    if field not in table.schema_arrow.names:
        raise LmforgeError(f"{path}: no column {field!r} (columns: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value:
                yield value


# ---- token cache ------------------------------------------------------------------------------------
@dataclass
class TokenCache:
    """A flat array of token ids on disk (memory-mapped), documents separated by EOS."""

    path: Path
    num_tokens: int
    num_docs: int
    dtype: str

    def tokens(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))


@dataclass
class TokenCaches:
    train: TokenCache
    val: TokenCache | None


def _fingerprint_sources(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend", None)
    text = (backend.to_str() if backend is not None
            else f"{type(tokenizer).__qualname__}:{tokenizer.vocab_size}:{tokenizer.eos_id}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_val(index: int, seed: int, fraction: float) -> bool:
    """Deterministic document split that does not depend on the number of documents."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def _write_tokens(docs: Iterable[str], tokenizer, path: Path, chunk_docs: int = 256) -> tuple[int, int, str]:
    """Tokenize in chunks (tokenizers' encode_batch runs on all cores) and stream ids to ``path``."""
    if tokenizer.eos_id is None:
        raise LmforgeError("the tokenizer has no EOS token to separate documents")
    dtype = "uint16" if tokenizer.vocab_size <= 65535 else "uint32"
    n_tokens = n_docs = 0
    with atomic_file(path, "wb") as out:
        chunk: list[str] = []

        def flush() -> None:
            nonlocal n_tokens, n_docs
            for ids in tokenizer.encode_batch(chunk, add_special_tokens=False):
                arr = np.asarray([*ids, tokenizer.eos_id], dtype=dtype)
                out.write(arr.tobytes())
                n_tokens += len(arr)
                n_docs += 1
            chunk.clear()

        for doc in docs:
            chunk.append(doc)
            if len(chunk) >= chunk_docs:
                flush()
        if chunk:
            flush()
    return n_tokens, n_docs, dtype


def build_token_cache(paths: Sequence[str | Path], tokenizer, cache_dir: str | Path, *,
                      val_paths: Sequence[str | Path] = (), val_fraction: float = 0.0, text_field: str = "text",
                      glob: str = "**/*", max_docs: int | None = None, seed: int = 0) -> TokenCaches:
    """Tokenize ``paths`` into ``cache_dir`` (reused while sources, tokenizer and options are unchanged).

    Validation: the files in ``val_paths``, or else a deterministic ``val_fraction`` of the documents.
    """
    files = expand_paths(paths, glob)
    val_files = expand_paths(val_paths, glob) if val_paths else []
    key = {"version": CACHE_VERSION, "sources": _fingerprint_sources(files), "val_sources": _fingerprint_sources(val_files),
           "tokenizer": tokenizer_fingerprint(tokenizer), "val_fraction": val_fraction if not val_files else None,
           "text_field": text_field, "max_docs": max_docs, "seed": seed}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path = cache_dir / f"{name}.json"
    cached = _load_meta(meta_path, key)
    if cached is not None:
        return cached

    def limited(docs: Iterator[str]) -> Iterator[str]:
        for i, d in enumerate(docs):
            if max_docs is not None and i >= max_docs:
                return
            yield d

    all_docs = list(limited(read_documents(files, text_field, glob)))
    if not all_docs:
        raise LmforgeError(f"no documents found in {', '.join(map(str, paths))}")
    if val_files:
        train_docs, val_docs = all_docs, list(read_documents(val_files, text_field, glob))
    else:
        flags = [_is_val(i, seed, val_fraction) for i in range(len(all_docs))]
        if val_fraction > 0 and not any(flags) and len(all_docs) > 1:
            flags[-1] = True  # tiny corpora still get a held-out document
        train_docs = [d for d, v in zip(all_docs, flags) if not v]
        val_docs = [d for d, v in zip(all_docs, flags) if v]
    if not train_docs:
        raise LmforgeError("every document went to validation; lower data.val_fraction")
    parts = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        if not docs:
            continue
        n_tok, n_docs, dtype = _write_tokens(docs, tokenizer, cache_dir / f"{name}.{split}.bin")
        parts[split] = {"num_tokens": n_tok, "num_docs": n_docs, "dtype": dtype}
    with atomic_file(meta_path, "w") as f:  # written last: its presence means the .bin files are complete
        json.dump({"key": key, "parts": parts}, f, indent=2)
    loaded = _load_meta(meta_path, key)
    assert loaded is not None
    return loaded


def _load_meta(meta_path: Path, key: dict) -> TokenCaches | None:
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None  # damaged: rebuild
    if meta.get("key") != key:
        return None
    caches = {}
    for split, info in meta["parts"].items():
        path = meta_path.with_name(meta_path.stem + f".{split}.bin")
        expected = info["num_tokens"] * np.dtype(info["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            return None  # truncated or missing: rebuild
        caches[split] = TokenCache(path, info["num_tokens"], info["num_docs"], info["dtype"])
    return TokenCaches(caches["train"], caches.get("val"))


# ---- packed sequences -------------------------------------------------------------------------------
class PackedDataset:
    """Item i = tokens[i*L : i*L + L + 1] as input_ids = w[:-1], labels = w[1:] (L = seq_len)."""

    def __init__(self, cache: TokenCache, seq_len: int) -> None:
        self.cache, self.seq_len = cache, seq_len
        self._tokens: np.ndarray | None = None
        if (cache.num_tokens - 1) // seq_len == 0:
            raise LmforgeError(f"{cache.num_tokens} tokens cannot fill one sequence of {seq_len}+1; "
                               "add data or lower data.seq_len")

    def __len__(self) -> int:
        return (self.cache.num_tokens - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._tokens is None:  # opened lazily so the dataset pickles cheaply into worker processes
            self._tokens = self.cache.tokens()
        w = torch.from_numpy(self._tokens[i * self.seq_len:(i + 1) * self.seq_len + 1].astype(np.int64))
        return {"input_ids": w[:-1], "labels": w[1:]}

