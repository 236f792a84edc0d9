"""Atomic file and directory writes: a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lmforge.errors import LmforgeError


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` in one rename.

    An existing ``path`` is moved aside first and deleted only after the new one is in place,
    so at every instant either the old or the new directory is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json_object(file: str | os.PathLike, error: type[Exception] = LmforgeError) -> dict:
    """A JSON file that must hold an object (config.json and the like); ``error`` names the file otherwise."""
    try:
        raw = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"{file}: expected a JSON object, got {type(raw).__name__}")
    return raw


def iter_jsonl(path: str | os.PathLike, error: type[Exception] = LmforgeError,
               errors: str = "strict") -> Iterator[tuple[str, Any]]:
    """``(file:line, value)`` for each non-blank line of a JSONL file.

    Bad UTF-8 (unless ``errors="replace"``, which decodes it as U+FFFD) or bad JSON raises ``error`` naming the
    file, line and byte offset in the file; what a record must contain is the caller's to check (it knows the
    field names).
    """
    offset = 0  # of the current line in the file, so a bad byte is located exactly
    with open(path, "rb") as fh:  # binary, so a bad UTF-8 byte can be reported with its line number
        for n, raw in enumerate(fh, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise error(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start} of the line, byte offset "
                            f"{offset + e.start} in the file)") from None
            offset += len(raw)
            raw = None  # a line can be 100s of MB: keep only the parsed value while the caller works on it
            if not line or line.isspace():  # not strip(): that would copy the line
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg})") from None
            line = None
            yield where, value
