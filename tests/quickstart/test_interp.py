"""`lmforge quickstart-interp` end to end on a stand-in quickstart run (tiny model, tiny sizes)."""

from __future__ import annotations

import json

import pytest

from lmforge import save_model
from lmforge.cli import main
from lmforge.data.synthetic import skill_examples, write_jsonl
from lmforge.data.tokenizer import train_bpe_tokenizer
from lmforge.models.config import Config
from lmforge.models.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quickstart_interp_runs_every_study(tmp_path, capsys):
    run = tmp_path / "qs"
    train = skill_examples(800, seed=0)
    write_jsonl(train, run / "data" / "skills_train.jsonl")
    write_jsonl(skill_examples(40, seed=1), run / "data" / "skills_test.jsonl")
    texts = [m["content"] for r in train for m in r["messages"]]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    cfg = Config.from_hf(dict(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=256))
    save_model(Transformer(cfg).init_weights(std=0.05, seed=0), run / "sft", tokenizer=tok)
    (run / "summary.json").write_text(json.dumps({"checkpoint": str(run / "sft")}))
    args = ["quickstart-interp", "--run", str(run), "--lens-prompts", "3", "--patch-pairs", "4",
            "--contrast-pairs", "4", "--steer-prompts", "3", "--steer-scales", "0,2", "--sae-steps", "2",
            "--sae-seq-len", "64"]
    assert main(args) == 0
    out = run / "interp"
    summary = json.loads((out / "summary.json").read_text())
    lens = summary["logit_lens"]
    assert lens["layers"] == ["embed", "L0", "L1"] and len(lens["answer_prob"]) == 3
    assert all(0.0 <= p <= 1.0 for p in lens["answer_prob"])
    patch = summary["patching"]
    assert len(patch["resid_pre"]) == 2 and len(patch["resid_pre"][0]) == len(patch["tokens"])
    # Patching layer 0's residual at the one corrupted position restores the clean run exactly.
    assert patch["resid_pre"][0][patch["corrupted_position"]] == pytest.approx(1.0, abs=1e-4)
    steer = summary["steering"]
    assert steer["scales"] == [0.0, 2.0] and set(steer["layers"]) == {"L0", "L1"}
    sae = summary["sae"]["metrics"]
    assert sae["l0"] <= 32 and sae["d_sae"] == 4 * 32 and sae["tokens"] >= 64
    for name in ("lens.png", "patching_resid.png", "patching_heads.png", "steering.png", "report.md",
                 "sae/cfg.json", "sae/sae_weights.safetensors", "sae/features.md"):
        assert (out / name).is_file(), name
    assert "## Logit lens" in capsys.readouterr().out

    assert main(["quickstart-interp", "--run", str(tmp_path / "missing")]) == 2
    assert "lmforge quickstart" in capsys.readouterr().err
    assert main(args + ["--steer-scales", "0,x"]) == 2
