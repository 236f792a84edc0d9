"""Pretraining data: local files -> documents -> parallel tokenization -> memory-mapped token cache -> packed sequences.

Document boundaries are EOS separators: every document is followed by the tokenizer's EOS token and the
stream is cut into fixed-length windows that may span documents (plain GPT-style packing; attention is not
blocked at boundaries, the EOS tells the model that a new document starts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.io import atomic_file, iter_jsonl

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".html", ".css",
                 ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".sh", ".tex"}
CACHE_VERSION = 2
# encode_batch runs on all cores; a chunk must be big enough to keep them busy but bounded in memory.
CHUNK_DOCS = 1024
CHUNK_CHARS = 8 << 20
# A document longer than this is tokenized as pieces of at most this many characters (cut at a word boundary,
# see ``iter_cuts``): the tokenizer's working memory grows faster than linearly with the length of one input
# (a 110 MB single-line document took >15 GB), and 64K characters keeps a long document's pieces as cheap as
# ordinary documents. Pieces go through encode_batch like documents; only a document's last is followed by EOS.
PIECE_CHARS = 1 << 16
# How undecodable bytes in text files are treated: "strict" (an error naming the file and byte offset) or
# "replace" (U+FFFD, only when asked for explicitly).
TEXT_ERRORS = ("strict", "replace")


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


def read_documents(paths: Sequence[str | Path], text_field: str = "text", glob: str = "**/*",
                   errors: str = "strict") -> Iterator[str]:
    """Yield documents in a deterministic order; empty documents are skipped.

    A text file is one document, a JSONL line or a Parquet row is one document (field/column ``text_field``).
    Directories are walked in sorted order, keeping files that match ``glob`` and have a known suffix.
    ``errors``: "strict" (default) rejects a text or JSONL file that is not UTF-8 (or, for text files, holds a
    NUL byte: a binary file), naming the file and byte offset; "replace" decodes bad bytes as U+FFFD.
    """
    _check_errors(errors)
    for f in expand_paths(paths, glob):
        if f.suffix == ".jsonl":
            yield from _read_jsonl(f, text_field, errors)
        elif f.suffix == ".parquet":
            yield from _read_parquet(f, text_field)
        else:
            text = read_text_file(f, errors)
            if text and not text.isspace():  # not strip(): that copies a file that can be 100s of MB
                yield text


def _check_errors(errors: str) -> None:
    if errors not in TEXT_ERRORS:
        raise LmforgeError(f"errors must be one of {', '.join(TEXT_ERRORS)}, got {errors!r}")


def read_text_file(path: Path, errors: str = "strict") -> str:
    """A text file's contents; with ``errors="strict"`` bad UTF-8 or a NUL byte raises, naming file and offset."""
    raw = path.read_bytes()
    if errors == "replace":
        return raw.decode("utf-8", errors="replace")
    nul = raw.find(b"\0")
    if nul >= 0:  # valid UTF-8 but not text: training on it would teach the model binary noise
        raise LmforgeError(f"{path}: NUL byte at byte offset {nul}; a binary file, not text "
                           "(remove it from the data, or narrow data.glob)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path}: not valid UTF-8 at byte offset {e.start} ({e.reason}); convert it to UTF-8, "
                           "or read it with errors='replace' to train on U+FFFD in its place") from None


def _read_jsonl(path: Path, field: str, errors: str = "strict") -> Iterator[str]:
    for where, record in iter_jsonl(path, errors=errors):
        if not isinstance(record, dict) or field not in record:
            raise LmforgeError(f"{where}: record has no {field!r} field")
        text = record[field]
        if not isinstance(text, str):
            raise LmforgeError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
        if text:
            yield text


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise LmforgeError(f"{path}: cannot read Parquet file ({e})") from None
    schema = table.schema_arrow
    if field not in schema.names:
        raise LmforgeError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise LmforgeError(f"{path}: column {field!r} has type {kind}, expected string")
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value:  # nulls and empty strings are not documents
                yield value


# ---- token cache ------------------------------------------------------------------------------------
@dataclass
class TokenCache:
    """A flat array of token ids on disk, documents separated by EOS; read through a memory map."""

    path: Path
    num_tokens: int
    num_docs: int
    dtype: str

    def tokens(self) -> np.ndarray:
        expected = self.num_tokens * np.dtype(self.dtype).itemsize
        size = self.path.stat().st_size if self.path.is_file() else -1
        if size != expected:  # changed under us after it was built: fail clearly, not with an mmap error
            raise LmforgeError(f"token cache {self.path} has {size} bytes, expected {expected}; "
                               "delete it and run again to re-tokenize")
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))


@dataclass
class TokenCaches:
    train: TokenCache
    val: TokenCache | None
    reused: bool = False  # True when an existing cache matched and nothing was tokenized


def _fingerprint_sources(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies the id mapping: the full serialized tokenizer when there is one, else a probe encoding."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "to_str"):
        body = backend.to_str()
    else:
        probe = "Hello, world! 123 ünïcödé 日本語 \t\n def f(x): return x"
        body = f"{type(tokenizer).__qualname__}|{tokenizer.encode(probe, add_special_tokens=False)}"
    body += f"|vocab={tokenizer.vocab_size}|eos={tokenizer.eos_id}"
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _is_val(index: int, seed: int, fraction: float) -> bool:
    """Deterministic per-document split that does not depend on the number of documents."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# Safe places to cut a long text, best first: just before a single space that sits between two non-space
# characters (" word" stays whole: GPT-2/Llama-3 style byte-level pre-tokenizers and Metaspace give the same
# tokens as for the uncut text), else just after a lone newline between non-space characters.
_CUTS = (re.compile(r"(?<=\S)(?= \S)"), re.compile(r"(?<=\S\n)(?=\S)"))
_CUT_BLOCK = 4096  # search backwards from the limit in blocks of this many characters


def iter_cuts(text: str, max_chars: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive pieces of ``text``, each at most ``max_chars`` characters, covering it.

    Each cut is at the last safe place (see ``_CUTS``) in the second half of the allowed span, so the tokens of
    the pieces are those of the whole text for byte-level BPE and Metaspace tokenizers (a tokenizer that adds a
    prefix to every encode call differs by that prefix per piece); a span with no safe place (one huge "word")
    is cut at ``max_chars``, where at most the tokens around the cut differ. Lazy, so a caller can hold one
    piece at a time beside the text.
    """
    start = 0
    while len(text) - start > max_chars:
        hi, lo = start + max_chars, start + max(1, max_chars // 2)
        cut = next((c for pattern in _CUTS if (c := _last_match(pattern, text, lo, hi)) is not None), hi)
        yield start, cut
        start = cut
    yield start, len(text)


def _last_match(pattern: re.Pattern, text: str, lo: int, hi: int) -> int | None:
    """The last position in ``[lo, hi]`` where the zero-width ``pattern`` matches in ``text``, or None."""
    end = hi
    while end > lo:
        begin = max(lo, end - _CUT_BLOCK)
        found = None
        # pos/endpos rather than a slice: the lookbehind sees text before ``begin``, and an endpos a little
        # past the block lets the lookahead see the characters after a cut at its very end.
        for m in pattern.finditer(text, begin, min(len(text), end + 2)):
            if m.start() <= end:
                found = m.start()
        if found is not None:
            return found
        end = begin
    return None


class _SplitWriter:
    """Buffers one split's documents and streams their ids, each followed by EOS, to an open file.

    A long document is buffered as bounded pieces (``iter_cuts``), so one encode_batch call never holds
    more than about ``CHUNK_CHARS`` characters plus one piece, whatever the document length."""

    def __init__(self, out: BinaryIO, tokenizer, dtype: str) -> None:
        self.out, self.tokenizer, self.dtype = out, tokenizer, dtype
        self.limit = np.iinfo(dtype).max
        self.chunk: list[str] = []
        self.ends: list[bool] = []  # chunk[i] is the last piece of its document: EOS follows it
        self.chars = self.num_tokens = self.num_docs = 0
        self.added = 0  # documents given to add(), flushed or not

    def add(self, doc: str) -> None:
        self.added += 1
        for start, end in iter_cuts(doc, PIECE_CHARS):
            self.chunk.append(doc if end - start == len(doc) else doc[start:end])  # no copy of a short document
            self.ends.append(end == len(doc))
            self.chars += end - start
            if len(self.chunk) >= CHUNK_DOCS or self.chars >= CHUNK_CHARS:
                self.flush()

    def flush(self) -> None:
        if not self.chunk:
            return
        eos = np.array([self.tokenizer.eos_id], dtype=np.int64)
        parts: list[np.ndarray] = []
        for ids, end in zip(self.tokenizer.encode_batch(self.chunk, add_special_tokens=False), self.ends):
            parts.append(np.asarray(ids, dtype=np.int64))
            if end:
                parts.append(eos)
        arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > self.limit):  # would wrap silently in the cast
            raise LmforgeError(f"token id {int(arr.max())} does not fit the cache dtype {self.dtype} "
                               f"(tokenizer vocab_size={self.tokenizer.vocab_size})")
        self.out.write(arr.astype(self.dtype).tobytes())
        self.num_tokens += arr.size
        self.num_docs += sum(self.ends)
        self.chunk.clear()
        self.ends.clear()
        self.chars = 0


def build_token_cache(paths: Sequence[str | Path], tokenizer, cache_dir: str | Path, *,
                      val_paths: Sequence[str | Path] = (), val_fraction: float = 0.0, text_field: str = "text",
                      glob: str = "**/*", max_docs: int | None = None, seed: int = 0,
                      errors: str = "strict") -> TokenCaches:
    """Tokenize the documents of ``paths`` into a flat token file per split under ``cache_dir``.

    Every document is followed by EOS: document boundaries are EOS separators in the stream. Documents are
    tokenized in chunks with the tokenizer's ``encode_batch`` (the Rust tokenizers library runs a batch on
    all CPU cores) and streamed to disk, and a document longer than ``PIECE_CHARS`` is tokenized in pieces cut
    at word boundaries, so memory stays bounded whatever the document length (the document's own text is held
    once, as read). ``errors``: how text files with bytes that are not UTF-8 are read (``read_documents``). The ids are stored as uint16 when the
    vocabulary fits, else uint32, beside a JSON meta file written last (atomically): its presence means the
    ``.bin`` files are complete.

    The cache is reused while the sources (paths, sizes, mtimes), tokenizer and options are unchanged;
    changed sources, or a damaged or truncated cache, are reported in the log and re-tokenized in place.

    Validation: the documents of ``val_paths``, or else a deterministic ``val_fraction`` of the documents
    (chosen by a hash of (seed, document index)); each split has its own ``.bin`` file.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LmforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer.eos_id is None:
        raise LmforgeError("the tokenizer has no EOS token to separate documents")
    _check_errors(errors)
    files = expand_paths(paths, glob)
    val_files = expand_paths(val_paths, glob) if val_paths else []
    # The name says *what* is cached; the key adds the source state, so an edit rebuilds in place
    # instead of leaving a stale copy of the corpus behind under another name.
    identity = {"paths": [str(Path(p).resolve()) for p in paths],
                "val_paths": [str(Path(p).resolve()) for p in val_paths], "glob": glob, "text_field": text_field,
                "val_fraction": val_fraction if not val_files else None, "max_docs": max_docs, "seed": seed,
                "tokenizer": tokenizer_fingerprint(tokenizer)}
    if errors != "strict":  # only then: caches built before this option keep their names
        identity["errors"] = errors
    key = {**identity, "version": CACHE_VERSION, "sources": _fingerprint_sources(files),
           "val_sources": _fingerprint_sources(val_files)}
    name = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / f"{name}.json"
    cached, problem = _load_meta(meta_path, key)
    if cached is not None:
        return cached
    if problem:
        log.warning("token cache %s: %s; re-tokenizing", meta_path, problem)

    dtype = token_dtype(tokenizer.vocab_size)
    bins = {split: cache_dir / f"{name}.{split}.bin" for split in ("train", "val")}
    with contextlib.ExitStack() as stack:
        train = _SplitWriter(stack.enter_context(atomic_file(bins["train"], "wb")), tokenizer, dtype)
        val = _SplitWriter(stack.enter_context(atomic_file(bins["val"], "wb")), tokenizer, dtype)
        def split_of(index: int, is_last: bool) -> _SplitWriter:
            if val_files:
                return train
            if _is_val(index, seed, val_fraction):
                return val
            if is_last and val_fraction > 0 and index > 0 and val.added == 0:
                return val  # a tiny corpus still gets one held-out document
            return train

        pending: str | None = None  # held back one step, since only the last document may need rerouting
        n_docs = 0
        for doc in read_documents(files, text_field, glob, errors):
            if max_docs is not None and n_docs >= max_docs:
                break
            if pending is not None:
                split_of(n_docs - 1, is_last=False).add(pending)
            pending, n_docs = doc, n_docs + 1
        if pending is None:
            raise LmforgeError(f"no documents found in {', '.join(map(str, paths))}")
        split_of(n_docs - 1, is_last=True).add(pending)
        for doc in read_documents(val_files, text_field, glob, errors) if val_files else ():
            val.add(doc)
        train.flush()
        val.flush()
        if train.num_docs == 0:
            raise LmforgeError("every document went to validation; lower data.val_fraction")
    parts = {split: {"num_tokens": w.num_tokens, "num_docs": w.num_docs, "dtype": dtype}
             for split, w in (("train", train), ("val", val)) if w.num_docs}
    if "val" not in parts:
        bins["val"].unlink(missing_ok=True)
    with atomic_file(meta_path, "w") as f:  # written last: its presence means the .bin files are complete
        json.dump({"key": key, "parts": parts}, f, indent=2)
    built, problem = _load_meta(meta_path, key)
    if built is None:
        raise LmforgeError(f"token cache {meta_path} is unreadable right after writing it: {problem}")
    built.reused = False
    return built


def _load_meta(meta_path: Path, key: dict) -> tuple[TokenCaches | None, str | None]:
    """The cache described by ``meta_path`` if it matches ``key`` and is complete, else (None, why not)."""
    if not meta_path.is_file():
        return None, None  # never built: nothing to report
    try:
        meta = json.loads(meta_path.read_text())
        parts = meta["parts"]
        stored_key = meta["key"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None, "meta file is damaged"
    if stored_key != key:
        changed = sorted(k for k in key if stored_key.get(k) != key[k])
        return None, f"{', '.join(changed)} changed since it was built"
    caches = {}
    for split, info in parts.items():
        path = meta_path.with_name(f"{meta_path.stem}.{split}.bin")
        expected = info["num_tokens"] * np.dtype(info["dtype"]).itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            return None, f"{path.name} is {'missing' if size is None else f'{size} bytes, expected {expected}'}"
        caches[split] = TokenCache(path, info["num_tokens"], info["num_docs"], info["dtype"])
    if "train" not in caches:
        return None, "meta file lists no training split"
    return TokenCaches(caches["train"], caches.get("val"), reused=True), None


# ---- packed sequences -------------------------------------------------------------------------------
class PackedDataset:
    """Item i = tokens[i*L : i*L + L + 1] as input_ids = w[:-1], labels = w[1:] (L = seq_len).

    Windows overlap by one token so that every token but the very first is a target exactly once;
    a trailing partial window is dropped. Windows cross document boundaries (EOS-separated packing).
    """

    def __init__(self, cache: TokenCache, seq_len: int) -> None:
        if seq_len < 1:
            raise LmforgeError(f"seq_len must be positive, got {seq_len}")
        self.cache, self.seq_len = cache, seq_len
        self._tokens: np.ndarray | None = None
        if len(self) == 0:
            raise LmforgeError(f"{cache.num_tokens} tokens cannot fill one sequence of {seq_len}+1; "
                               "add data or lower data.seq_len")

    def __len__(self) -> int:
        return max(self.cache.num_tokens - 1, 0) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._tokens is None:  # opened lazily so the dataset pickles cheaply into worker processes
            self._tokens = self.cache.tokens()
        w = torch.from_numpy(self._tokens[i * self.seq_len:(i + 1) * self.seq_len + 1].astype(np.int64))
        return {"input_ids": w[:-1], "labels": w[1:]}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}  # never pickle the memory map itself
