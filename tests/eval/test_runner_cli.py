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


CHATML_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def test_larger_chat_scores_choices_after_the_chat_template(model_dir, monkeypatch):
    """The exact strings, and the tokens, the model is given: the chat template's, then the choice."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    seen, real = [], scoring.loglikelihood

    def spy(m, t, reqs, *a, **k):
        seen.extend(reqs)
        return real(m, t, reqs, *a, **k)

    monkeypatch.setattr(scoring, "loglikelihood", spy)
    r = Evaluator(model, tok, limit=2, bootstrap_iters=10).run(resolve_task("larger_chat"))
    question = "Which is larger, 72 or 80? Answer with the number only."
    ctx = CHATML_USER.format(question)
    assert seen[:2] == [(ctx, "72"), (ctx, "80")] and len(seen) == 4
    template_ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    ctx_ids, cont_ids = scoring.encode_pair(tok, ctx, "80")
    assert (ctx_ids + cont_ids)[:len(template_ids)] == template_ids
    assert (ctx_ids + cont_ids)[len(template_ids):] == tok.encode("80", add_special_tokens=False)
    assert r["n"] == 2 and 0 <= r["acc"] <= 1


def test_code_chat_renders_the_chat_template_and_scores_fenced_code(model_dir, monkeypatch):
    task = resolve_task("code_chat")
    d = task.docs
    replies = [f"Here it is:\n\n```python\n{d[0]['prompt']}{d[0]['canonical_solution']}```\n\nIt adds them.",
               f"```python\n{d[1]['canonical_solution']}```",  # only the body, fenced
               f"{d[2]['prompt']}{d[2]['canonical_solution']}",  # no fence: the whole function as plain text
               "```python\ndef count_vowels(s):\n    return 0\n```"]  # wrong
    calls = []

    def fake_generate(model, tok, prompts, max_new_tokens, stop, *rest):
        calls.append((list(prompts), max_new_tokens, list(stop)))
        return replies[:len(prompts)]

    monkeypatch.setattr(scoring, "generate_texts", fake_generate)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    r = Evaluator(model, tok, limit=4, log_samples=True, bootstrap_iters=10).run(task)
    (prompts, max_new, stop), = calls
    assert prompts[0] == CHATML_USER.format(
        "Complete the following Python function. Reply with the whole function in one ```python code block.\n\n"
        f"```python\n{d[0]['prompt']}```")
    assert (max_new, stop) == (384, [])
    assert [s["status"][0] for s in r["samples"]] == ["passed", "passed", "passed", "failed"]
    assert r["pass@1"] == pytest.approx(0.75)
    assert r["samples"][0]["code"] == [f"{d[0]['prompt']}{d[0]['canonical_solution']}"]


def test_cli_task_options(model_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = main(["eval", "--model", str(model_dir), "--tasks", "larger,larger_chat,stdlib_heldout", "--limit", "3",
               "--task-option", "chat=true", "--task-option", "larger:fewshot=1", "--output", str(out),
               "--bootstrap-iters", "10"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["tasks"] == ["larger[chat=true,fewshot=1]", "larger_chat", "stdlib_heldout"]
    assert report["config"]["task_options"] == {"chat": True, "larger": {"fewshot": 1}}
    assert set(report["results"][str(model_dir)]) == set(report["config"]["tasks"])
    assert "| larger[chat=true,fewshot=1] | acc |" in capsys.readouterr().out
    assert main(["eval", "--model", str(model_dir), "--tasks", "larger", "--task-option", "colour=red"]) == 2
    assert "lmforge eval: error: unknown task option 'colour' (options: chat," in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--tasks", "larger",
                 "--task-option", "larger:max_new_tokens=9"]) == 2
    assert "'max_new_tokens' does not apply to larger.yaml" in capsys.readouterr().err
