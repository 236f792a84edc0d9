"""Training checkpoints: everything needed to continue a run exactly, written atomically.

Layout of ``<run>/checkpoints/step-00000100/``:
  model/             HF-format model (config.json + safetensors + tokenizer), loadable by transformers;
                     with LoRA this is the merged model and ``adapter/`` holds the PEFT adapter
  trainable.safetensors  the trainable parameters exactly as trained (LoRA runs; small)
  optimizer.pt       optimizer, LR-scheduler and RNG states (tensors and numbers only)
  state.json         the loop that wrote it (``trainer``), step, world size, and the loop's own: tokens seen
                     and recipe, or the RL config
``<run>/checkpoints/latest`` names the newest complete checkpoint. A checkpoint directory is built
beside its final name and renamed into place, and ``latest`` is replaced only after that, so a crash
mid-save leaves the previous checkpoint as "latest". What such a crash leaves behind (a ``.step-N.*.tmp``
directory holding a full model copy, ...) is removed when a run starts in that directory
(``remove_stale_temporaries``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import CheckpointError
from lmforge.io import atomic_directory, atomic_file

LATEST = "latest"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(run_dir: str | Path, step: int, *, write_model, trainable: dict[str, torch.Tensor] | None,
                     optimizer_state: dict[str, Any], state: dict[str, Any], keep: int = 2) -> Path:
    """Write one checkpoint; ``write_model(dir)`` writes the HF model (and adapter) into ``dir``."""
    final = step_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(final) as tmp:
        write_model(tmp)
        if trainable is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
    with atomic_file(checkpoint_root(run_dir) / LATEST, "w") as f:
        f.write(final.name + "\n")
    _prune(run_dir, keep, protect=final)
    return final


def _prune(run_dir: str | Path, keep: int, protect: Path) -> None:
    done = sorted(p for p in checkpoint_root(run_dir).glob("step-*") if p.is_dir() and "." not in p.name)
    for old in done[:-keep]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


# What ``io.atomic_directory``/``atomic_file`` leave when the process is killed mid-save (tempfile's names:
# 8 characters of [a-z0-9_]); nothing else in the run directory is ever touched.
_STALE_TMP = re.compile(r"\.step-\d{8}\.[a-z0-9_]{8}\.tmp")  # a checkpoint being written
_STALE_OLD = re.compile(r"\.(step-\d{8})\.old-\d+")  # a checkpoint moved aside while being replaced
_STALE_FILE = re.compile(r"\.latest\.[a-z0-9_]{8}\.tmp")  # the ``latest`` pointer being replaced
_STALE_MODEL = re.compile(r"\.model\.[a-z0-9_]{8}\.tmp")  # <run>/model being written (RL commands)


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete what saves killed mid-way left in ``run_dir`` (call it before a run starts there, on rank 0 only);
    returns what was removed. A checkpoint moved aside and never replaced (killed between the two renames) is
    put back under its name instead, since ``latest`` may name it."""
    run_dir, root = Path(run_dir), checkpoint_root(run_dir)
    removed: list[Path] = []
    for folder, pattern in ((root, _STALE_TMP), (root, _STALE_OLD), (root, _STALE_FILE), (run_dir, _STALE_MODEL)):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            m = pattern.fullmatch(p.name)
            if m is None:
                continue
            if pattern is _STALE_OLD and p.is_dir() and not (root / m.group(1)).exists():
                os.replace(p, root / m.group(1))
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist; the run directory is damaged")
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor] | None]:
    """(state.json, optimizer state, trainable tensors or None), with clear errors for damaged files."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a training checkpoint (no state.json)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'state.json'} is corrupt: {e}") from None
    try:
        # weights_only: tensors, numbers and containers only; never arbitrary pickled objects.
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no optimizer.pt; cannot resume exactly") from None
    except Exception as e:  # torch raises several types for truncated/corrupt archives
        raise CheckpointError(f"{path / 'optimizer.pt'} is corrupt or truncated ({type(e).__name__}: {e})") from None
    trainable = None
    if (path / "trainable.safetensors").is_file():
        try:
            trainable = load_file(path / "trainable.safetensors")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / 'trainable.safetensors'} is corrupt ({e})") from None
    return state, optimizer, trainable
