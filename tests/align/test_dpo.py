"""DPO on the training engine: reference caching, the loss at initialisation, learning a preference, CLI."""

from __future__ import annotations

import json
import math
import random

import pytest

from lmforge.align.dpo import preference_accuracy  # importing lmforge.align.dpo registers the dpo and rm tasks
from lmforge.cli import main
from lmforge.data.tokenizer import train_bpe_tokenizer
from lmforge.train.recipe import load_recipe
from lmforge.train.run import build_trainer

MODEL = ("model.config={model_type: llama, vocab_size: 400, hidden_size: 48, intermediate_size: 96, "
         "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}")
WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "light", "paper", "sugar"]


def pairs(n, seed):
    """The chosen answer repeats the prompt's word politely; the rejected one names another word rudely."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w, other = rng.sample(WORDS, 2)
        out.append({"prompt": f"Say {w}.", "chosen": f" Sure: {w}. Thanks!", "rejected": f" No. {other}"})
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    texts = [f"Say {w}. Sure: {w}. Thanks! No. {w}" for w in WORDS] * 20
    train_bpe_tokenizer(texts, vocab_size=400).save(root / "tok")
    for name, n, seed in (("train", 96, 0), ("val", 32, 1)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs(n, seed)))
    return root


def recipe(workspace, tmp_path, *extra):
    return load_recipe(None, ["task=dpo", MODEL, f"tokenizer={workspace / 'tok'}", f"out_dir={tmp_path / 'run'}",
                              f"data.train=[{workspace / 'train.jsonl'}]", f"data.val=[{workspace / 'val.jsonl'}]",
                              "data.seq_len=32", "batch_size=8", "max_steps=40", "progress=false", "plot=false",
                              "eval_every=0", "save_every=0", "optim.lr=3e-3", "optim.warmup_steps=0",
                              "preference.beta=0.5", *extra])


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_first_step_loss_is_log_two(workspace, tmp_path, smoothing):
    """Policy == reference at step 1, so h = 0 and -(1-e) log s(0) - e log s(0) = log 2 for any e."""
    trainer = build_trainer(recipe(workspace, tmp_path, f"preference.label_smoothing={smoothing}"))
    assert abs(trainer.train_step()["loss"] - math.log(2)) < 1e-5


def test_nll_term_adds_the_chosen_answers_per_token_nll(workspace, tmp_path):
    """DPO+NLL at step 1: the DPO part is log 2 (policy == reference), plus the chosen answers' mean NLL."""
    import torch

    from lmforge.align.losses import sequence_logprobs
    from lmforge.data.sft import IGNORE_INDEX

    trainer = build_trainer(recipe(workspace, tmp_path, "preference.nll_weight=0.5"))
    items = trainer.data.train.items[:4]
    batch = trainer.objective.collate(items, trainer.data.pad_id)
    with torch.no_grad():
        loss = float(trainer.objective.loss(trainer.forward(batch), batch)) / len(items)
        logits = trainer.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        chosen_labels = batch["labels"][:len(items)]
        chosen_sum = sequence_logprobs(logits[:len(items)], chosen_labels)
        per_token_nll = -(chosen_sum / (chosen_labels != IGNORE_INDEX).sum(1)).mean()
    assert abs(loss - (math.log(2) + 0.5 * float(per_token_nll))) < 1e-5


def test_negative_nll_weight_is_refused_by_the_recipe(workspace, tmp_path):
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="preference.nll_weight"):
        recipe(workspace, tmp_path, "preference.nll_weight=-0.5")


def test_dpo_learns_the_preference_and_generalises(workspace, tmp_path):
    trainer = build_trainer(recipe(workspace, tmp_path))
    before = preference_accuracy(trainer, trainer.data.val, trainer.objective)
    assert before["accuracy"] == 0.0 and before["margin"] == 0.0  # implicit reward is 0 before training
    result = trainer.fit()
    after = preference_accuracy(trainer, trainer.data.val, trainer.objective)
    assert after["accuracy"] >= 0.9 and after["margin"] > 0
    assert result.losses[-1] < 0.3 < math.log(2)


@pytest.mark.parametrize("loss_type", ["ipo", "simpo"])
def test_variants_train(workspace, tmp_path, loss_type):
    trainer = build_trainer(recipe(workspace, tmp_path, f"preference.loss_type={loss_type}", "max_steps=15"))
    losses = trainer.fit().losses
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_cli_reports_accuracy_and_rejects_bad_records(workspace, tmp_path, capsys):
    args = ["dpo", "task=dpo", MODEL, f"tokenizer={workspace / 'tok'}", f"out_dir={tmp_path / 'cli'}",
            f"data.train=[{workspace / 'train.jsonl'}]", f"data.val=[{workspace / 'val.jsonl'}]", "data.seq_len=32",
            "batch_size=8", "max_steps=3", "progress=false", "plot=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out preference accuracy before" in out and "held-out preference accuracy after" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    assert main(args[:5] + [f"data.train=[{bad}]"] + args[6:]) == 2
    assert "rejected" in capsys.readouterr().err


def test_reward_model_cli_trains_saves_and_resumes(workspace, tmp_path, capsys):
    from lmforge.align.reward_model import load_reward_model
    from lmforge.train import checkpoint as ckpt

    args = ["rm", MODEL, f"tokenizer={workspace / 'tok'}", f"out_dir={tmp_path / 'rm'}",
            f"data.train=[{workspace / 'train.jsonl'}]", f"data.val=[{workspace / 'val.jsonl'}]", "data.seq_len=32",
            "batch_size=8", "max_steps=30", "save_every=15", "progress=false", "plot=false", "optim.lr=3e-3",
            "optim.warmup_steps=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    after = float(out.split("held-out pairwise accuracy after: ")[1].split("%")[0])
    assert after >= 90.0, out
    final = ckpt.latest_checkpoint(tmp_path / "rm") / "model"
    rm = load_reward_model(final)  # the checkpoint holds the backbone (HF format) and the head
    assert rm.head.weight.abs().sum() > 0
    assert main(args[:-5] + ["max_steps=32", "save_every=15", "progress=false", "plot=false", "--resume"]) == 0
