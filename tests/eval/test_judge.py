"""Pairwise judging: both orders cancel position bias; LC win rate removes a length effect; BT/Elo."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmforge import load_model, load_tokenizer
from lmforge.eval.judge import (LogprobJudge, bradley_terry, length_controlled_win_rate, pairwise_preferences,
                                win_rate)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_both_orders_cancel_position_bias():
    always_first = lambda q, a, b: 0.9  # noqa: E731
    prefs = pairwise_preferences(always_first, ["q"] * 3, ["x", "y", "z"], ["u", "v", "w"])
    assert prefs.p == pytest.approx([0.5] * 3) and prefs.disagreement == pytest.approx([0.8] * 3)
    longer = lambda q, a, b: float(len(a) > len(b))  # noqa: E731
    prefs = pairwise_preferences(longer, ["q"] * 2, ["long answer", "s"], ["short", "longer"])
    assert list(prefs.p) == [1.0, 0.0] and win_rate(prefs.p) == 0.5


@pytest.mark.parametrize("quality", [0.0, 1.0])
def test_length_controlled_win_rate_recovers_quality(quality):
    rng = np.random.default_rng(0)
    len_b = rng.integers(50, 150, 400)
    len_a = len_b + rng.integers(0, 120, 400)  # a is (almost) always longer
    diff = (len_a - len_b).astype(float)
    p = sigmoid(quality + 2.0 * np.tanh(diff / diff.std()))  # the judge likes length
    assert win_rate(p) > sigmoid(quality) + 0.1
    assert length_controlled_win_rate(p, len_a, len_b) == pytest.approx(sigmoid(quality), abs=1e-3)


def test_bradley_terry_elo_recovers_strengths_with_seeded_cis():
    strengths = {"a": 0.0, "b": 1.0, "c": -0.5}
    battles = [(i, j, float(sigmoid(strengths[i] - strengths[j])))
               for i in strengths for j in strengths if i != j for _ in range(5)]
    ratings = bradley_terry(battles, iters=50, seed=0)
    scale = 400 / math.log(10)
    assert ratings["b"]["elo"] - ratings["a"]["elo"] == pytest.approx(scale, abs=0.5)
    assert ratings["a"]["elo"] - ratings["c"]["elo"] == pytest.approx(0.5 * scale, abs=0.5)
    assert np.mean([r["elo"] for r in ratings.values()]) == pytest.approx(1000)
    for r in ratings.values():
        assert r["lower"] <= r["elo"] + 1e-6 and r["elo"] <= r["upper"] + 1e-6
    assert bradley_terry(battles, iters=50, seed=0) == ratings


def test_logprob_judge_on_a_tiny_model(model_dir):
    judge = LogprobJudge(load_model(model_dir), load_tokenizer(model_dir))
    p = judge("What is 2 + 2?", "4", "5")
    assert 0.0 < p < 1.0


def test_unreachable_judge_endpoint_is_a_clear_error():
    from lmforge.errors import LmforgeError
    from lmforge.eval.judge import EndpointJudge

    from ..serve.tiny_server import free_port

    judge = EndpointJudge(f"http://127.0.0.1:{free_port()}/v1", "judge", timeout=5)  # nothing listens there
    with pytest.raises(LmforgeError, match="unreachable"):
        judge("q", "a", "b")


def test_endpoint_judge_against_an_lmforge_server(model_dir):
    pytest.importorskip("uvicorn")
    from lmforge.eval.judge import EndpointJudge, pairwise_preferences
    from lmforge.engine.engine import Engine
    from lmforge.serve.server import build_app

    from ..serve.tiny_server import running

    with running(build_app(Engine(model_dir), "judge")) as base:
        judge = EndpointJudge(f"{base}/v1", "judge")
        prefs = pairwise_preferences(judge, ["q1", "q2"], ["short", "a"], ["longer answer", "b"])
        assert prefs.p.shape == (2,) and ((0 <= prefs.p) & (prefs.p <= 1)).all()


def test_judge_cli(model_dir, tmp_path, capsys):
    import json

    from lmforge.cli import main

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"q{i}", "output": "yes" * (i + 1)}) + "\n" for i in range(4)))
    b.write_text("".join(json.dumps({"prompt": f"q{i}", "output": "no"}) + "\n" for i in range(4)))
    assert main(["judge", "--a", str(a), "--b", str(b), "--judge-model", str(model_dir),
                 "--output", str(tmp_path / "r.json")]) == 0
    assert "length-controlled" in capsys.readouterr().out
    assert 0 <= json.loads((tmp_path / "r.json").read_text())["win_rate"] <= 1
    b.write_text(json.dumps({"prompt": "other", "output": "x"}) + "\n")
    assert main(["judge", "--a", str(a), "--b", str(b), "--judge-model", str(model_dir)]) == 2
    assert "same prompts" in capsys.readouterr().err
