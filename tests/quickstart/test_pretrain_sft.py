"""The README's main command, shrunk: every stage runs and leaves an HF checkpoint that transformers loads."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main


def test_quickstart_end_to_end_small(tmp_path, capsys):
    out = tmp_path / "qs"
    code = main(["quickstart", "--out", str(out), "--corpus-mb", "0.3", "--pretrain-steps", "6",
                 "--sft-steps", "4", "--test-size", "8", "--vocab-size", "512", "--eval-limit", "4"])
    assert code == 0
    text = capsys.readouterr().out
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "lmforge generate --model"):
        assert stage in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrain_val_ppl_after"] < summary["pretrain_val_ppl_before"]
    assert 0.0 <= summary["sft_accuracy_after"]["all"] <= 1.0 and "add2" in summary["sft_accuracy_after"]
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    tok = transformers.AutoTokenizer.from_pretrained(summary["checkpoint"])
    assert model.config.vocab_size >= len(tok)
    assert (out / "pretrain" / "loss.png").is_file() and (out / "sft" / "metrics.jsonl").is_file()
    # The printed command works.
    assert main(["generate", "--model", summary["checkpoint"], "--chat", "--prompt", "What number comes after 7?",
                 "--max-new-tokens", "4"]) == 0
