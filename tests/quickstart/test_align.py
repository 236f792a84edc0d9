"""`lmforge quickstart-align` end to end on a stand-in quickstart run (tiny model, a few steps)."""

from __future__ import annotations

import json

import pytest

from lmforge import save_model
from lmforge.cli import main
from lmforge.data.synthetic import skill_examples, write_jsonl
from lmforge.data.tokenizer import train_bpe_tokenizer
from lmforge.models.config import Config
from lmforge.models.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, as in tests/align (see tests/conftest.py)


def test_quickstart_align_runs_every_stage(tmp_path, capsys):
    run = tmp_path / "qs"
    train = skill_examples(200, seed=0)
    write_jsonl(train, run / "data" / "skills_train.jsonl")
    texts = [m["content"] for r in train for m in r["messages"]]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    cfg = Config.from_hf(dict(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=128))
    save_model(Transformer(cfg).init_weights(std=0.05, seed=0), run / "sft", tokenizer=tok)
    (run / "summary.json").write_text(json.dumps({"checkpoint": str(run / "sft")}))
    args = ["quickstart-align", "--run", str(run), "--skill", "add1", "--test-size", "6", "--grpo-steps", "1",
            "--ppo-steps", "1", "--dpo-prompts", "4", "--rm-steps", "1", "--dpo-steps", "1", "--rollouts", "8",
            "--train-size", "40"]
    assert main(args) == 0
    summary = json.loads((run / "align" / "summary.json").read_text())
    assert summary["test_size"] == 6 and 0.0 <= summary["sft_accuracy"] <= 1.0
    for method in ("grpo", "ppo"):
        assert 0.0 <= summary[method]["accuracy"] <= 1.0 and summary[method]["steps"] == 1
        assert abs(summary[method]["accuracy"] - summary["sft_accuracy"] - summary[method]["gain"]) < 1e-9
    assert "dpo" in summary  # a random model rarely gets answers right: DPO may be skipped, never a crash
    out = capsys.readouterr().out
    assert "held-out add1 accuracy" in out

    assert main(["quickstart-align", "--run", str(tmp_path / "missing")]) == 2
    assert "lmforge quickstart" in capsys.readouterr().err
    assert main(args + ["--methods", "grpo,rlhf"]) == 2
