"""The shared on-policy loop (GRPO and PPO): exact resume, what a checkpoint holds, atomic saves, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.align.grpo import GRPOConfig, GRPOTrainer
from lmforge.align.ppo import PPOConfig, PPOTrainer
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.train import checkpoint as ckpt
from lmforge.train.trainer import read_metrics

from .test_grpo import PROMPTS, starts_lowercase, tiny_model

ROOT = Path(__file__).resolve().parents[2]
TIMING = {"rollout_tok_s", "update_tok_s"}  # wall-clock rates: the only values allowed to differ between runs


def make(kind: str, tok, out: Path, **overrides):
    if kind == "grpo":
        kw = dict(steps=6, prompts_per_step=2, group_size=4, max_new_tokens=3, lr=1e-2, beta=0.05,
                  updates_per_batch=2, save_every=3, progress=False)
        return GRPOTrainer(tiny_model(), tok, PROMPTS, starts_lowercase, GRPOConfig(**{**kw, **overrides}), out)
    kw = dict(steps=6, rollout_batch_size=8, mini_batch_size=4, max_new_tokens=3, lr=3e-3, kl_coef=0.1, ref_ema=0.9,
              save_every=3, progress=False)
    return PPOTrainer(tiny_model(), tok, PROMPTS, starts_lowercase, PPOConfig(**{**kw, **overrides}), out)


class Stop(Exception):
    pass


def curve(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run / "metrics.jsonl")]


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_resume_continues_the_same_curve(tok, tmp_path, kind):
    full = make(kind, tok, tmp_path / "a")
    full.fit()

    def stop_after_5(step, record):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        make(kind, tok, tmp_path / "b").fit(on_step=stop_after_5)
    assert ckpt.latest_checkpoint(tmp_path / "b").name == "step-00000003"
    resumed = make(kind, tok, tmp_path / "b")
    history = resumed.fit(resume=True)
    assert [h["step"] for h in history] == [4, 5, 6]  # steps 4-5 redone, the interrupted records dropped
    a, b = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert [r["step"] for r in a] == list(range(1, 7)) and a == b  # exactly, metric by metric
    for name, p in full.module.state_dict().items():
        assert torch.equal(p, resumed.module.state_dict()[name]), name
    if full.reference is not None:
        for name, p in full.reference.state_dict().items():
            assert torch.equal(p, resumed.reference.state_dict()[name]), name


def test_ppo_checkpoint_contents(tok, tmp_path):
    from lmforge.models.checkpoint import load_model

    trainer = make("ppo", tok, tmp_path / "r", steps=2, save_every=1)
    trainer.fit()
    latest = ckpt.latest_checkpoint(tmp_path / "r")
    assert latest.name == "step-00000002"
    state = json.loads((latest / "state.json").read_text())
    assert state["trainer"] == "ppo" and state["step"] == 2 and state["config"]["ref_ema"] == 0.9
    extra = load_file(latest / "trainable.safetensors")
    assert torch.equal(extra["value_head.weight"], trainer.module.value_head.weight)
    assert torch.equal(extra["reference.lm_head.weight"], trainer.reference.lm_head.weight)
    opt = torch.load(latest / "optimizer.pt", weights_only=True)  # tensors and numbers only
    assert set(opt) == {"optimizer", "scheduler", "rng"}
    policy = load_model(latest / "model")
    assert torch.equal(policy.lm_head.weight, trainer.model.lm_head.weight)
    assert (tmp_path / "r" / "ppo_config.json").is_file() and (tmp_path / "r" / "loss.png").is_file()


def test_resume_rejects_a_mismatched_checkpoint(tok, tmp_path):
    make("ppo", tok, tmp_path / "r", steps=1).fit()
    with pytest.raises(CheckpointError, match="not a grpo checkpoint"):
        make("grpo", tok, tmp_path / "r", steps=2).fit(resume=True)
    with pytest.raises(CheckpointError, match="does not match this run's setup"):
        make("ppo", tok, tmp_path / "r", steps=2, ref_ema=None).fit(resume=True)  # no EMA reference to restore


def test_failed_save_leaves_the_previous_checkpoint(tok, tmp_path, monkeypatch):
    trainer = make("ppo", tok, tmp_path / "r", steps=1)
    trainer.fit()
    before = ckpt.latest_checkpoint(tmp_path / "r")
    trainer.step = 2

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert ckpt.latest_checkpoint(tmp_path / "r") == before
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == sorted(["latest", before.name])


def test_non_finite_loss_stops_before_the_update(tok, tmp_path):
    trainer = make("ppo", tok, tmp_path / "r", steps=1)
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    real_loss = trainer.loss

    def nan_loss(minibatch):
        loss, stats = real_loss(minibatch)
        return loss * float("nan"), stats

    trainer.loss = nan_loss
    with pytest.raises(LmforgeError, match="not finite"):
        trainer.fit()
    assert all(torch.equal(v, trainer.module.state_dict()[k]) for k, v in before.items())


def test_torchrun_two_processes(tok, tmp_path):
    """`torchrun -m lmforge.cli ppo` with 2 CPU processes (gloo): it completes and rank 0 alone writes the files."""
    from lmforge import save_model

    save_model(tiny_model(), tmp_path / "m", tokenizer=tok)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Answer {i}"}], "answer": str(i)})
                               + "\n" for i in range(8)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge.cli",
           "ppo", "--model", str(tmp_path / "m"), "--prompts", str(prompts), "--out", str(tmp_path / "run"),
           "--steps", "2", "--rollout-batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens", "3",
           "--save-every", "1", "--reward", "regex:[a-z]"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("mean reward") == 1 and "2 process(es)" in r.stdout
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [rec["step"] for rec in records] == [1, 2]
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
