"""The quickstart's report card: rows from every quickstart that ran in the directory, expected ranges by
thread count, runs outside them named."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import LmforgeError
from lmforge.quickstart.report import headline_metrics, load_expected, metric_bounds, report_card, spread

SUMMARY = {"seed": 0, "threads": 2, "pretrain_val_ppl_before": 4324.4, "pretrain_val_ppl_after": 68.9,
           "sft_accuracy_before": {"next": 0.0, "add2": 0.0, "all": 0.0},
           "sft_accuracy_after": {"next": 1.0, "add2": 0.1, "all": 0.55},
           "stdlib_bits_per_byte": {"pretrained": 2.35, "sft": 2.5}, "checkpoint": "x", "minutes": 9.5}


def test_spread_is_mean_sd_and_an_interval_covering_every_run():
    s = spread([0.6, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7333333) and s["sd"] == pytest.approx(0.1527525) and s["runs"] == 3
    assert s["low"] == pytest.approx(0.7333333 - 2 * 0.1527525) and s["high"] == pytest.approx(0.7333333 + 2 * 0.1527525)
    assert spread([0.5]) == {"mean": 0.5, "sd": 0.0, "low": 0.5, "high": 0.5, "runs": 1}
    wide = spread([0.06, 0.1, 0.7], metric_bounds("sft_accuracy.add2"))  # mean +- 2 sd would leave [0, 1]
    assert (wide["low"], wide["high"]) == (0.0, 1.0)
    assert spread([1.0, 9.0], metric_bounds("minutes"))["low"] == 0.0


def test_card_rows_expected_ranges_and_outside(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    expected = tmp_path / "expected.json"
    values = {"sft_accuracy.all": [0.64, 0.65, 0.66], "pretrain_ppl": [68.0, 69.0, 70.0]}
    expected.write_text(json.dumps({"threads": {"2": {"metrics": {k: spread(v) for k, v in values.items()}},
                                                "1": {"metrics": {"sft_accuracy.all": spread([0.5, 0.56])}}}}))
    card = report_card(run, expected_path=expected)
    rows = {r["metric"]: r for r in card["rows"]}
    assert rows["accuracy: all"]["before"] == 0.0 and rows["accuracy: all"]["after"] == 0.55
    assert rows["held-out perplexity (stdlib, 3% of files)"]["expected"]["mean"] == pytest.approx(69.0)
    assert card["outside"] == ["accuracy: all"]  # 55% < 65% - 2 sd
    assert "**outside**" in card["markdown"] and (run / "report.md").read_text() == card["markdown"]
    assert json.loads((run / "report.json").read_text())["outside"] == ["accuracy: all"]
    assert "| sft | stdlib bits per byte (5 unseen modules; lower is better) | 2.35 | 2.50 |" in card["markdown"]
    # the same run judged at 1 thread: inside that count's range
    assert report_card(run, threads=1, expected_path=expected)["outside"] == []
    assert report_card(run, threads=4, expected_path=expected)["outside"] == []  # no study for 4 threads
    assert "No expected ranges" in (run / "report.md").read_text()


def test_card_adds_the_other_quickstarts_that_ran(tmp_path):
    run = tmp_path / "run"
    (run / "align").mkdir(parents=True)
    (run / "reason").mkdir()
    (run / "interp").mkdir()
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    (run / "align" / "summary.json").write_text(json.dumps(
        {"skill": "add2", "sft_accuracy": 0.1, "grpo": {"accuracy": 0.2}, "dpo": {"accuracy": 0.15}}))
    curve = [{"n": 1, "accuracy": 0.03}, {"n": 32, "accuracy": 0.24}]
    (run / "reason" / "summary.json").write_text(json.dumps(
        {"direct": {"greedy": 0.04}, "think_greedy": 0.08, "curves": {"think": {"verifier": curve}}}))
    (run / "interp" / "summary.json").write_text(json.dumps(
        {"logit_lens": {"answer_top1": [0.0, 0.5, 0.9]}, "sae": {"metrics": {"explained_variance": 0.8}}}))
    rows = {(r["stage"], r["metric"]): (r["before"], r["after"]) for r in report_card(run)["rows"]}
    # a later main quickstart replaces the SFT model: the others' older summaries drop off the card
    import os

    for stage in ("align", "reason", "interp"):
        os.utime(run / stage / "summary.json", (1_000_000, 1_000_000))
    assert {r["stage"] for r in report_card(run)["rows"]} == {"pretrain", "sft", "quickstart"}
    assert rows[("align", "GRPO accuracy (add2, vs SFT)")] == (0.1, 0.2)
    assert rows[("align", "DPO accuracy (add2, vs SFT)")] == (0.1, 0.15)
    assert rows[("reason", "greedy accuracy: direct answer -> thinking")] == (0.04, 0.08)
    assert rows[("reason", "verifier best-of-N: N = 1 -> 32")] == (0.03, 0.24)
    assert rows[("interp", "logit lens: answer is top-1, embedding -> final layer")] == (0.0, 0.9)
    assert rows[("interp", "SAE explained variance")] == (None, 0.8)


def test_card_needs_a_finished_run_and_expected_file_is_optional(tmp_path):
    with pytest.raises(LmforgeError, match="summary.json not found"):
        report_card(tmp_path)
    assert load_expected(2, tmp_path / "missing.json") == {}
    (tmp_path / "summary.json").write_text(json.dumps({"checkpoint": "x"}))  # hand-made: a checkpoint only
    assert report_card(tmp_path)["rows"] == []


def test_headline_metrics_flatten_the_summary():
    m = headline_metrics(SUMMARY)
    assert m == {"pretrain_ppl": 68.9, "minutes": 9.5, "sft_accuracy.next": 1.0, "sft_accuracy.add2": 0.1,
                 "sft_accuracy.all": 0.55, "stdlib_bpb_after_sft": 2.5, "stdlib_bpb_pretrained": 2.35}
