"""The ``lmforge`` lm-eval model against lm-eval's own ``hf`` model on the same tiny checkpoint."""

from __future__ import annotations

import pytest

from tests.eval.test_lm_eval_parity import DOCS, REQUESTS, _lm_eval_task

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmforge.eval.lm_eval_adapter import LmforgeLM  # noqa: E402


@pytest.fixture(scope="module")
def adapter(model_dir):
    return LmforgeLM(pretrained=str(model_dir), batch_size=3, max_length=16)


@pytest.fixture(scope="module")
def hflm(model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), backend="causal", device="cpu", dtype="float32", batch_size=4,
                max_length=16)


def test_registered_and_built_from_arg_string(model_dir):
    cls = get_model("lmforge")
    assert cls is LmforgeLM
    lm = cls.create_from_arg_string(f"pretrained={model_dir},dtype=float32,max_length=32",
                                    {"batch_size": 2, "max_batch_size": None, "device": "cpu"})
    assert (lm.batch_size, lm.max_length, str(lm.device)) == (2, 32, "cpu")
    with pytest.raises(Exception, match="unknown"):
        cls.create_from_arg_string(f"pretrained={model_dir},bogus=1")


def test_loglikelihood_and_rolling_match_hflm(adapter, hflm):
    reqs = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)]
    for (a, ga), (b, gb) in zip(adapter.loglikelihood(reqs), hflm.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    rolling = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCS)]
    # a document's sum of ~60 float32 log-probs (-318): 1e-5 absolute is below its float32 spacing (3e-5)
    assert adapter.loglikelihood_rolling(rolling) == pytest.approx(hflm.loglikelihood_rolling(rolling), rel=1e-7,
                                                                   abs=1e-5)


def test_simple_evaluate_matches_hf_model(model_dir, tmp_path, monkeypatch):
    from lmforge.eval.builtin.make_data import larger

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    _lm_eval_task(tmp_path, larger(12, seed=3))
    tm = TaskManager(include_path=str(tmp_path))
    runs = {}
    for name, args in (("lmforge", f"pretrained={model_dir},batch_size=5"),
                       ("hf", f"pretrained={model_dir},dtype=float32,batch_size=4")):
        runs[name] = lm_eval.simple_evaluate(model=name, model_args=args, tasks=["tiny_larger"], task_manager=tm,
                                             num_fewshot=1, device="cpu", log_samples=True, bootstrap_iters=0)
    ours, theirs = (runs[k]["results"]["tiny_larger"] for k in ("lmforge", "hf"))
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[metric] == pytest.approx(theirs[metric], abs=1e-12)
    ours_s, theirs_s = (sorted(runs[k]["samples"]["tiny_larger"], key=lambda s: s["doc_id"]) for k in runs)
    assert len(ours_s) == len(theirs_s) == 12
    for a, b in zip(ours_s, theirs_s):
        assert a["arguments"] == b["arguments"]  # same prompts (same fewshot sampling)
        assert [r[0] for r in a["filtered_resps"]] == pytest.approx([r[0] for r in b["filtered_resps"]], abs=1e-5)
        assert [r[1] for r in a["filtered_resps"]] == [r[1] for r in b["filtered_resps"]]
        assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])


def test_generate_until_stops_and_matches_hflm(adapter, hflm):
    prompt = "the quick brown"
    free = adapter.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 8}), 0)])[0]
    assert free, "the random model produced nothing to cut"
    stop = free[len(free) // 2:len(free) // 2 + 1]
    reqs = [Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 8, "do_sample": False}), 0),
            Instance("generate_until", {}, ("def add(a, b):", {"until": ["\n\n"], "max_gen_toks": 5}), 1)]
    out = adapter.generate_until(reqs)
    assert out[0] == free[:free.index(stop)] and stop not in out[0]
    assert out == hflm.generate_until(reqs)  # identical greedy decoding


def test_simple_evaluate_with_the_chat_template(model_dir, tmp_path, monkeypatch):
    """What the README suggests for a chat model: a local JSONL task, apply_chat_template, multi-turn shots."""
    from lmforge.eval.builtin.make_data import larger

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    _lm_eval_task(tmp_path, larger(4, seed=3))
    res = lm_eval.simple_evaluate(model="lmforge", model_args=f"pretrained={model_dir},batch_size=4",
                                  tasks=["tiny_larger"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  num_fewshot=1, apply_chat_template=True, fewshot_as_multiturn=True,
                                  device="cpu", log_samples=True, bootstrap_iters=0)
    assert 0 <= res["results"]["tiny_larger"]["acc,none"] <= 1
    for s in res["samples"]["tiny_larger"]:
        context = s["arguments"][0][0]
        assert context.startswith("<|im_start|>user\nWhich is larger") and context.endswith("<|im_start|>assistant\n")
        assert context.count("<|im_start|>assistant\n") == 2  # the shot's answer turn, then the open one
