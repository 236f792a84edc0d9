"""``lmforge eval`` end to end on two tiny models, and the code task through the runner."""

from __future__ import annotations

import json

import pytest

from lmforge import load_model, load_tokenizer
from lmforge.cli import main
from lmforge.eval import scoring
from lmforge.eval.runner import Evaluator, markdown_table
from lmforge.eval.tasks import resolve_task
from tests.eval.conftest import make_model_dir


def test_cli_two_models_side_by_side(model_dir, tmp_path, capsys):
    other = make_model_dir(tmp_path / "other", seed=1)
    out = tmp_path / "results.json"
    rc = main(["eval", "--model", str(model_dir), "--model", str(other), "--tasks", "larger,arithmetic,stdlib_heldout",
               "--limit", "4", "--output", str(out), "--markdown", str(tmp_path / "table.md"), "--bootstrap-iters", "50"])
    assert rc == 0
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert f"| task | metric | n | {model_dir} | {other} |" in table
    for model in (str(model_dir), str(other)):
        r = report["results"][model]
        assert r["larger"]["n"] == 4 and 0 <= r["larger"]["acc"] <= 1 and "acc_norm_stderr" in r["larger"]
        assert r["arithmetic"]["n"] == 4 and "exact_match" in r["arithmetic"]
        assert r["stdlib_heldout"]["bits_per_byte"] > 0
    assert report["results"][str(model_dir)]["stdlib_heldout"] != report["results"][str(other)]["stdlib_heldout"]
    assert (tmp_path / "table.md").read_text().strip() == table.strip()


def test_cli_errors_are_one_line(model_dir, capsys):
    assert main(["eval", "--model", str(model_dir), "--tasks", "nope"]) == 2
    assert "lmforge eval: error: unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--tasks", "larger", "--limit", "0"]) == 2


def test_code_task_through_runner(model_dir, monkeypatch):
    """Completions stand in for the model: right, wrong, endless and networked; pass@1 counts only the first."""
    task = resolve_task("code")
    task.timeout_s = 1.5
    canned = [task.docs[0]["canonical_solution"], "    return 0\n", "    while True:\n        pass\n",
              "    import socket\n    socket.socket()\n    return a + b\n"]
    monkeypatch.setattr(scoring, "generate_texts", lambda *a, **k: canned[:len(a[2])])
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    r = Evaluator(model, tok, limit=4, log_samples=True).run(task)
    # doc 0 gets the right answer; docs 1-3 get wrong / looping / socket-opening code
    assert r["pass@1"] == pytest.approx(0.25)
    assert [s["status"][0] for s in r["samples"]] == ["passed", "failed", "timeout", "blocked"]
    assert "pass@1" in markdown_table({"results": {"m": {"code": r}}})
