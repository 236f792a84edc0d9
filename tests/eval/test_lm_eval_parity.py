"""Our log-likelihoods and acc/acc_norm against lm-evaluation-harness's HFLM and plain transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge import load_model, load_tokenizer
from lmforge.eval import scoring
from lmforge.eval.runner import Evaluator
from lmforge.eval.tasks import load_task

# Trailing space moved to the continuation, an empty context, left truncation past max_length=16.
REQUESTS = [("Which is larger, 3 or 7?\nAnswer:", " 7"), ("Question: 2 + 2 =", " 4 apples"),
            ("Hi ", "there"), ("", "hello world"), ("a" * 40, " b b"), ("x " * 9, "yes no yes")]
DOCS = ["the quick brown fox jumps over the lazy dog, then jumps back over it again and again", "short", "a b"]


@pytest.fixture(scope="module")
def ours(model_dir):
    return load_model(model_dir), load_tokenizer(model_dir)


def _hflm(model_dir, **kw):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), backend="causal", device="cpu", dtype="float32", **kw)


def test_loglikelihood_and_rolling_match_lm_eval(model_dir, ours):
    from lm_eval.api.instance import Instance

    lm = _hflm(model_dir, batch_size=4, max_length=16)
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)])
    mine = scoring.loglikelihood(*ours, REQUESTS, batch_size=3, max_length=16)
    for (a, ga), (b, gb) in zip(mine, theirs):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    theirs = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCS)])
    mine = scoring.loglikelihood_rolling(*ours, DOCS, batch_size=2, max_length=16)
    # a document's sum of ~60 float32 log-probs (-318): 1e-5 absolute is below its float32 spacing (3e-5)
    assert mine == pytest.approx(theirs, rel=1e-7, abs=1e-5)


def _lm_eval_task(tmp_path, docs):
    data = tmp_path / "larger.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_larger.yaml").write_text(f"""task: tiny_larger
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Which is larger, {{{{a}}}} or {{{{b}}}}?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    # our task file over the same data
    (tmp_path / "ours.yaml").write_text(f"""name: tiny_larger
type: multiple_choice
data: {data.name}
prompt: "Which is larger, {{a}} or {{b}}?\\nAnswer:"
choices: choices
target: gold
""")
    return tmp_path


def test_multiple_choice_acc_matches_lm_eval(model_dir, ours, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmforge.eval.builtin.make_data import larger

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    docs = larger(16, seed=5)
    _lm_eval_task(tmp_path, docs)
    lm = _hflm(model_dir, batch_size=8)
    tm = TaskManager(include_path=str(tmp_path))
    model, tok = ours
    for shots in (0, 2):
        res = lm_eval.simple_evaluate(model=lm, tasks=["tiny_larger"], num_fewshot=shots, task_manager=tm,
                                      log_samples=True, bootstrap_iters=0)
        samples = sorted(res["samples"]["tiny_larger"], key=lambda s: s["doc_id"])
        for s in samples:  # same (context, continuation) strings -> same numbers
            mine = scoring.loglikelihood(model, tok, [tuple(a) for a in s["arguments"]])
            theirs = [tuple(r) for r in s["filtered_resps"]]
            assert [m[0] for m in mine] == pytest.approx([t[0] for t in theirs], abs=1e-5)
            m = scoring.choice_metrics([x[0] for x in mine], docs[s["doc_id"]]["choices"], s["target"])
            assert (m["acc"], m["acc_norm"]) == (s["acc"], s["acc_norm"])
        if shots == 0:  # our task file builds the same prompts: compare the whole pipeline
            out = Evaluator(model, tok, batch_size=5).run(load_task(tmp_path / "ours.yaml"))
            assert out["acc"] == pytest.approx(res["results"]["tiny_larger"]["acc,none"], abs=1e-12)
            assert out["acc_norm"] == pytest.approx(res["results"]["tiny_larger"]["acc_norm,none"], abs=1e-12)


def test_loglikelihood_matches_direct_transformers(model_dir, ours):
    """Independent of lm-eval: one unpadded transformers forward per request, log-softmax, sum."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model, tok = ours
    reqs = [r for r in REQUESTS if r[0] and len(r[0]) < 30]
    mine = scoring.loglikelihood(model, tok, reqs, batch_size=4)
    for (ctx, cont), (score, greedy) in zip(reqs, mine):
        n_sp = len(ctx) - len(ctx.rstrip())
        c, x = (ctx[:-n_sp], ctx[-n_sp:] + cont) if n_sp else (ctx, cont)
        whole = tok.encode(c + x)
        n = len(whole) - len(tok.encode(c))
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0, :-1].float(), -1)
        target = torch.tensor(whole[1:])
        picked = logp.gather(-1, target[:, None])[-n:].sum().item()
        assert score == pytest.approx(picked, abs=1e-5)
        assert greedy == bool((logp.argmax(-1)[-n:] == target[-n:]).all())


def test_is_greedy_and_batch_invariance(ours):
    model, tok = ours
    ctx = tok.encode("Question: What is 3 + 4?")
    with torch.no_grad():
        ids = list(ctx)
        for _ in range(4):  # the model's own argmax continuation must be is_greedy
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    pairs = [(ctx, ids[len(ctx):]), (ctx, [ids[len(ctx)] + 1]), (tok.encode("a"), tok.encode(" b c d e"))]
    one = scoring.loglikelihood_tokens(model, pairs, batch_size=1)
    many = scoring.loglikelihood_tokens(model, pairs, batch_size=3)
    assert one[0][1] is True and one[1][1] is False
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb and not math.isnan(a)
