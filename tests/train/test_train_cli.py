"""`lmforge pretrain` / `lmforge sft` from the command line, including LoRA, bf16 and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.data.synthetic import arithmetic_examples, write_jsonl
from lmforge.data.tokenizer import train_bpe_tokenizer
from lmforge.train import checkpoint as ckpt
from lmforge.train.trainer import read_metrics

from .tiny_run import make_trainer

MODEL = ("model.config={model_type: llama, vocab_size: 320, hidden_size: 32, intermediate_size: 64, "
         "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    docs = root / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"{i}.txt").write_text(f"def function_{i}(x):\n    return x * {i} + {i * 7}\n" * 5)
    tok = train_bpe_tokenizer(sorted(docs.glob("*.txt")), vocab_size=320)
    tok.save(root / "tok")
    write_jsonl(arithmetic_examples(64, seed=0, max_operand=9), root / "chats.jsonl")
    return root


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pretrain_then_lora_sft(workspace, capsys, tmp_path):
    code, out, err = run(["pretrain", f"tokenizer={workspace / 'tok'}", MODEL, f"data.train=[{workspace / 'docs'}]",
                          "data.seq_len=32", "batch_size=4", "max_steps=4", f"out_dir={tmp_path / 'pre'}",
                          f"data.cache_dir={tmp_path / 'cache'}", "progress=false", "eval_every=2"], capsys)
    assert code == 0, err
    assert "validation loss" in out
    model_dir = ckpt.latest_checkpoint(tmp_path / "pre") / "model"
    code, out, err = run(["sft", "--dora", f"model.path={model_dir}", f"tokenizer={workspace / 'tok'}",
                          f"data.train=[{workspace / 'chats.jsonl'}]", "data.seq_len=48", "batch_size=4",
                          "max_steps=3", f"out_dir={tmp_path / 'sft'}", "progress=false", "lora.r=4"], capsys)
    assert code == 0, err
    assert "trainable" in out and "loss on assistant tokens only" in out
    final = ckpt.latest_checkpoint(tmp_path / "sft")
    assert (final / "adapter" / "adapter_config.json").is_file() and (final / "model" / "config.json").is_file()
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    merged = transformers.AutoModelForCausalLM.from_pretrained(final / "model")
    adapted = peft.PeftModel.from_pretrained(base, final / "adapter")
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert (adapted(ids).logits - merged(ids).logits).abs().max() < 1e-4


def test_sft_with_replay_mixes_pretraining_windows(workspace, capsys, tmp_path):
    """data.replay: a share of pretraining windows (loss on every token) beside the conversations, from the
    pretraining run's own token cache (same sources, split and seed: nothing re-tokenized)."""
    from lmforge.data.sft import IGNORE_INDEX, ReplayMixture
    from lmforge.train.recipe import load_recipe
    from lmforge.train.run import build_trainer

    code, _, err = run(["pretrain", f"tokenizer={workspace / 'tok'}", MODEL, f"data.train=[{workspace / 'docs'}]",
                        "data.seq_len=32", "batch_size=4", "max_steps=1", f"out_dir={tmp_path / 'pre'}",
                        f"data.cache_dir={tmp_path / 'cache'}", "progress=false", "data.val_fraction=0.25"], capsys)
    assert code == 0, err
    cached = sorted((tmp_path / "cache").iterdir())
    cfg = load_recipe(None, ["task=sft", f"model.path={ckpt.latest_checkpoint(tmp_path / 'pre') / 'model'}",
                             f"tokenizer={workspace / 'tok'}", f"data.train=[{workspace / 'chats.jsonl'}]",
                             "data.seq_len=48", "data.val_fraction=0", f"out_dir={tmp_path / 'sft'}",
                             f"data.cache_dir={tmp_path / 'cache'}", "data.replay.fraction=0.25",
                             f"data.replay.train=[{workspace / 'docs'}]", "data.replay.val_fraction=0.25",
                             "data.replay.seq_len=16", "max_steps=2", "batch_size=4", "progress=false"])
    trainer = build_trainer(cfg)
    assert sorted((tmp_path / "cache").iterdir()) == cached  # the pretraining cache, reused
    mix = trainer.data.train
    assert isinstance(mix, ReplayMixture) and len(mix.replay_index) == round(len(mix.sft) / 3)
    assert "replay windows of 16 pretraining tokens (25% of the mix" in trainer.data.describe
    replayed = mix[len(mix) - 1]
    assert len(replayed["input_ids"]) == 16 and (replayed["labels"] != IGNORE_INDEX).all()
    assert trainer.fit().steps == 2


@pytest.mark.parametrize("args, match", [
    (["data.train=[/nonexistent/corpus.txt]"], "data file /nonexistent/corpus.txt does not exist"),
    (["optim.lr=fast"], "'optim.lr' must be float"),
    (["data.seq_len=1000"], "exceeds the model's context length"),
    (["bogus_field=1"], "unknown recipe field 'bogus_field'"),
])
def test_bad_input_is_one_clear_line(workspace, capsys, tmp_path, args, match):
    code, out, err = run(["pretrain", f"tokenizer={workspace / 'tok'}", MODEL, f"data.train=[{workspace / 'docs'}]",
                          "data.seq_len=32", f"out_dir={tmp_path / 'r'}", f"data.cache_dir={tmp_path / 'c'}",
                          "progress=false", *args], capsys)
    assert code == 2
    assert err.startswith("lmforge pretrain: error:") and match in err and "Traceback" not in err


def test_resume_keeps_the_override_after_it(workspace, capsys, tmp_path):
    base = ["pretrain", f"tokenizer={workspace / 'tok'}", MODEL, f"data.train=[{workspace / 'docs'}]",
            "data.seq_len=32", "batch_size=2", f"out_dir={tmp_path / 'r'}", f"data.cache_dir={tmp_path / 'c'}",
            "progress=false", "plot=false", "eval_every=0", "save_every=0"]
    code, _, err = run([*base, "max_steps=2"], capsys)
    assert code == 0, err
    code, _, err = run([*base, "--resume", "max_steps=4"], capsys)  # max_steps=4 is an override, not a path
    assert code == 0, err
    assert [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert ckpt.latest_checkpoint(tmp_path / "r").name == "step-00000004"


@pytest.mark.parametrize("argv, resume, overrides", [
    (["--resume"], True, []),
    (["--resume", "max_steps=4", "optim.lr=1e-3"], True, ["max_steps=4", "optim.lr=1e-3"]),
    (["a.yaml", "seed=1", "--resume", "seed=2"], True, ["seed=1", "seed=2"]),  # command-line order kept
    (["--resume", "seed=2", "seed=1"], True, ["seed=2", "seed=1"]),
    (["--resume", "runs/a/checkpoints/step-00000002"], "runs/a/checkpoints/step-00000002", []),
    (["--resume", "./ckpt=v2", "seed=1"], "./ckpt=v2", ["seed=1"]),  # a path with '=' in it, written as ./PATH
])
def test_resume_takes_a_path_but_not_an_override(argv, resume, overrides):
    from lmforge.cli import build_parser
    from lmforge.train.cli import split_recipe

    for command in ("pretrain", "sft", "dpo"):
        args = build_parser().parse_args([command, *argv])
        assert args.resume == resume and split_recipe(args)[1] == overrides


def test_sft_bad_role_is_named(workspace, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n")
    from lmforge import save_model
    from lmforge.models.config import Config
    from lmforge.models.model import Transformer

    cfg = Config.from_hf(dict(model_type="llama", vocab_size=320, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    save_model(Transformer(cfg).init_weights(seed=0), tmp_path / "m")
    code, _, err = run(["sft", f"model.path={tmp_path / 'm'}", f"tokenizer={workspace / 'tok'}",
                        f"data.train=[{bad}]"], capsys)
    assert code == 2 and "bad.jsonl:1: message 0 has role 'wizard'" in err


def test_bf16_autocast_and_activation_checkpointing(tmp_path):
    plain = make_trainer(str(tmp_path / "a"), ["max_steps=2", "save_every=0"]).fit().losses
    ckpted = make_trainer(str(tmp_path / "b"), ["max_steps=2", "save_every=0", "activation_checkpointing=true"]).fit()
    assert max(abs(a - b) for a, b in zip(plain, ckpted.losses)) < 1e-5  # recomputation changes nothing
    bf16 = make_trainer(str(tmp_path / "c"), ["max_steps=2", "save_every=0", "precision=bf16"]).fit().losses
    assert all(abs(a - b) < 0.05 for a, b in zip(plain, bf16))
    assert [r["step"] for r in read_metrics(tmp_path / "c" / "metrics.jsonl") if "loss" in r] == [1, 2]
