"""The training loop: loss goes down, exact resume, atomic checkpoints, DDP == accumulation, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.train import checkpoint as ckpt
from lmforge.train.trainer import lr_multiplier, read_metrics

from .tiny_run import make_trainer

ROOT = Path(__file__).resolve().parents[2]


class Stop(Exception):
    pass


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_lr_schedule_warmup_then_cosine():
    assert lr_multiplier(0, 4, 20, 0.1) == 0.25
    assert lr_multiplier(3, 4, 20, 0.1) == 1.0
    assert lr_multiplier(4, 4, 20, 0.1) == 1.0
    assert abs(lr_multiplier(12, 4, 20, 0.1) - 0.55) < 1e-9  # halfway through the cosine
    assert abs(lr_multiplier(20, 4, 20, 0.1) - 0.1) < 1e-9


def test_loss_decreases_and_outputs_written(tmp_path):
    trainer = make_trainer(str(tmp_path / "run"), ["max_steps=40", "save_every=0", "plot=true", "optim.lr=1e-2", "batch_size=8"])
    result = trainer.fit()
    assert result.losses[-1] < result.losses[0] * 0.7
    run = tmp_path / "run"
    assert [s for s, _ in losses(run)] == list(range(1, 41))
    assert (run / "loss.png").stat().st_size > 1000
    assert (ckpt.latest_checkpoint(run) / "model" / "config.json").is_file()
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt.latest_checkpoint(run) / "model")
    ids = torch.arange(10)[None] % 97
    with torch.no_grad():
        assert (hf(ids).logits - trainer.model(ids)).abs().max() < 1e-4


@pytest.mark.parametrize("extra", [[], ["lora.enabled=true", "lora.dropout=0.1", "lora.r=4"]], ids=["full", "lora"])
def test_resume_continues_exactly(tmp_path, extra):
    full = make_trainer(str(tmp_path / "a"), extra, ragged=True)
    full.fit()

    def stop_after_5(trainer, record):
        if record["step"] == 5:
            raise Stop

    interrupted = make_trainer(str(tmp_path / "b"), extra, ragged=True)
    with pytest.raises(Stop):
        interrupted.fit(on_step=stop_after_5)
    assert ckpt.latest_checkpoint(tmp_path / "b").name == "step-00000003"
    resumed = make_trainer(str(tmp_path / "b"), extra, ragged=True)
    resumed.fit(resume=True)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # exactly, step by step (steps 4-5 redone)
    for name, p in full.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name


def test_interrupted_save_keeps_previous_latest(tmp_path, monkeypatch):
    trainer = make_trainer(str(tmp_path / "r"), ["max_steps=3", "save_every=0"])
    trainer.fit()
    before = ckpt.latest_checkpoint(tmp_path / "r")
    trainer.step = 4

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        trainer.save()
    assert ckpt.latest_checkpoint(tmp_path / "r") == before
    leftovers = [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()]
    assert leftovers == sorted(["latest", before.name]) or set(leftovers) == {"latest", before.name}


_KILLED_MID_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from tests.train.tiny_run import make_trainer

def killed(*a, **k):  # the model is written by now; SIGKILL: no cleanup handler runs, as for an OOM kill
    os.kill(os.getpid(), signal.SIGKILL)

trainer = make_trainer({run!r}, ["max_steps=4", "save_every=2"])
trainer.fit(on_step=lambda t, record: record["step"] == 3 and setattr(torch, "save", killed))
"""


def test_save_killed_midway_leaves_nothing_after_resume(tmp_path):
    run = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE.format(root=str(ROOT), run=str(run))],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr
    root = run / "checkpoints"
    leftovers = [p for p in root.iterdir() if p.name.startswith(".step-00000004.") and p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and (leftovers[0] / "model" / "model.safetensors").is_file()  # a full model copy
    assert ckpt.latest_checkpoint(run).name == "step-00000002"
    mine = [root / ".step-notes.tmp", run / ".model.tmp"]  # not names a save makes: left alone
    for p in mine:
        p.mkdir()
    make_trainer(str(run), ["max_steps=4", "save_every=2"]).fit(resume=True)
    assert not leftovers[0].exists() and all(p.is_dir() for p in mine)
    assert sorted(p.name for p in root.iterdir()) == sorted([".step-notes.tmp", "latest", "step-00000002",
                                                             "step-00000004"])


def test_checkpoint_moved_aside_by_a_killed_save_is_put_back(tmp_path):
    make_trainer(str(tmp_path / "r"), ["max_steps=2", "save_every=0"]).fit()
    root = tmp_path / "r" / "checkpoints"
    # killed between "move the old step-2 aside" and "rename the new one into place" (io.atomic_directory)
    os.replace(root / "step-00000002", root / ".step-00000002.old-4242")
    (root / ".latest.abcd1234.tmp").write_text("step-00000009\n")
    removed = ckpt.remove_stale_temporaries(tmp_path / "r")
    assert removed == [root / ".latest.abcd1234.tmp"]
    assert ckpt.latest_checkpoint(tmp_path / "r").name == "step-00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]


def test_corrupt_checkpoint_on_resume(tmp_path):
    make_trainer(str(tmp_path / "r"), ["max_steps=3", "save_every=0"]).fit()
    latest = ckpt.latest_checkpoint(tmp_path / "r")
    data = (latest / "optimizer.pt").read_bytes()
    (latest / "optimizer.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="optimizer.pt is corrupt or truncated"):
        make_trainer(str(tmp_path / "r"), ["max_steps=6"]).fit(resume=True)
    (latest / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="state.json is corrupt"):
        make_trainer(str(tmp_path / "r"), ["max_steps=6"]).fit(resume=True)


def test_sequence_longer_than_context(tmp_path):
    with pytest.raises(ConfigError, match="'data.seq_len' \\(128\\) exceeds the model's context length \\(64\\)"):
        make_trainer(str(tmp_path / "r"), ["data.seq_len=128"])


def test_frozen_model_is_an_error(tmp_path):
    trainer = make_trainer(str(tmp_path / "r"), ["max_steps=1"])
    trainer.model.requires_grad_(False)
    with pytest.raises(LmforgeError, match="nothing to train"):
        trainer.fit()


def _torchrun(out: Path, nproc: int, *overrides: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "train" / "tiny_run.py"), str(out), *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_accumulation(tmp_path, strategy):
    """2 ranks x batch 2 == 1 rank x batch 2 x accumulation 2: same global batches, same losses."""
    _torchrun(tmp_path / "one", 1, "grad_accum=2", "ragged")
    _torchrun(tmp_path / "two", 2, "grad_accum=1", f"strategy={strategy}", "ragged")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 7))
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one, two)
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "two") / "state.json").read_text())
    assert state["world_size"] == 2


def test_distillation_objective_is_wired(tmp_path):
    """With the teacher equal to the student's starting weights, KL is 0 at step 1: loss = (1 - w) * CE."""
    import copy

    plain = make_trainer(str(tmp_path / "plain"), ["max_steps=1", "save_every=0"], ragged=True)
    ce = plain.train_step()["loss"]
    student = make_trainer(str(tmp_path / "kd"), ["max_steps=1", "save_every=0", "distill.kd_weight=0.25"], ragged=True)
    student.teacher = copy.deepcopy(student.model).eval().requires_grad_(False)
    assert abs(student.train_step()["loss"] - 0.75 * ce) < 1e-5


def test_sparse_logits_give_the_dense_loss_and_gradients(tmp_path, monkeypatch):
    """Where most labels are masked (SFT), the LM head runs only at labelled positions: same loss and
    gradients as computing every position's logits."""
    from lmforge.data.sft import IGNORE_INDEX
    from lmforge.train import trainer as trainer_module

    trainer = make_trainer(str(tmp_path / "r"), ["max_steps=1", "save_every=0"], ragged=True)
    batch = trainer.objective.collate([trainer.data.train[i] for i in range(4)], trainer.data.pad_id)
    labelled = batch["labels"] != IGNORE_INDEX
    assert labelled.float().mean() < trainer_module.SPARSE_LOGITS_BELOW  # the sparse path is taken
    full = trainer.model(batch["input_ids"], attention_mask=batch["attention_mask"])
    sparse = trainer.model(batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=labelled)
    assert sparse.shape == (int(labelled.sum()), full.shape[-1])
    torch.testing.assert_close(sparse, full[labelled], rtol=0, atol=1e-6)

    def loss_and_grads():
        trainer.model.zero_grad()
        loss = trainer._loss(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]

    assert "logits_to_keep" in trainer.objective.forward_kwargs(batch)
    sparse_loss, sparse_grads = loss_and_grads()
    monkeypatch.setattr(trainer_module, "SPARSE_LOGITS_BELOW", 0.0)
    assert trainer.objective.forward_kwargs(batch) == {}
    dense_loss, dense_grads = loss_and_grads()
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-6, atol=1e-5)
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
