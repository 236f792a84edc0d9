"""The quickstart's report card: every stage's headline metric before -> after, from the summaries that the
quickstart commands leave in one run directory, beside the range that several seeds gave
(``benchmarks/quickstart_seeds.py`` writes that range to ``expected.json`` next to this file).

Written as RUN/report.md and RUN/report.json; every quickstart command refreshes it when it finishes.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmforge.io import atomic_file

EXPECTED = Path(__file__).with_name("expected.json")


@dataclass
class Row:
    stage: str
    metric: str
    before: float | None
    after: float | None
    key: str | None = None  # the name under which benchmarks/quickstart_seeds.py records the "after" value
    expected: dict[str, float] | None = None  # {"mean", "sd", "low", "high", "runs"} for this thread count
    fmt: str = "pct"  # how the values print: pct | num | int

    @property
    def outside(self) -> bool:
        return self.expected is not None and self.after is not None and not (
            self.expected["low"] <= self.after <= self.expected["high"])


def headline_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The main quickstart's figures that the seed study aggregates: {key: value}."""
    out = {"pretrain_ppl": summary["pretrain_val_ppl_after"], "minutes": summary["minutes"]}
    for skill, value in summary["sft_accuracy_after"].items():
        out[f"sft_accuracy.{skill}"] = value
    if summary.get("stdlib_bits_per_byte"):
        out["stdlib_bpb_after_sft"] = summary["stdlib_bits_per_byte"]["sft"]
        out["stdlib_bpb_pretrained"] = summary["stdlib_bits_per_byte"]["pretrained"]
    return out


def spread(values: list[float], bounds: tuple[float, float] = (0.0, math.inf)) -> dict[str, float]:
    """Mean, sample standard deviation and the expected interval of a metric over seeds: mean +- 2 sd, widened
    to the observed minimum and maximum (with few seeds the sd alone is a rough estimate), clipped to the
    metric's ``bounds`` (an accuracy lies in [0, 1])."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    low = max(min(mean - 2 * sd, min(values)), bounds[0])
    high = min(max(mean + 2 * sd, max(values)), bounds[1])
    return {"mean": mean, "sd": sd, "low": low, "high": high, "runs": len(values)}


def metric_bounds(key: str) -> tuple[float, float]:
    """Where a headline metric can lie: accuracies in [0, 1], the rest (perplexity, bits, minutes) >= 0."""
    return (0.0, 1.0) if key.startswith("sft_accuracy") else (0.0, math.inf)


def load_expected(threads: int, path: Path = EXPECTED) -> dict[str, dict[str, float]]:
    """The seed study's ranges for ``threads`` (the float summation order, hence the figures, depends on it);
    empty when the study has not been run for that thread count."""
    if not path.is_file():
        return {}
    study = json.loads(path.read_text())
    return study.get("threads", {}).get(str(threads), {}).get("metrics", {})


def _main_rows(summary: dict[str, Any]) -> list[Row]:
    """The main quickstart's rows, for the fields its summary has (a hand-made one may name only a checkpoint)."""
    rows = []
    if "pretrain_val_ppl_after" in summary:
        rows.append(Row("pretrain", "held-out perplexity (stdlib, 3% of files)", summary.get("pretrain_val_ppl_before"),
                        summary["pretrain_val_ppl_after"], "pretrain_ppl", fmt="num"))
    before = summary.get("sft_accuracy_before", {})
    rows += [Row("sft", f"accuracy: {skill}", before.get(skill), value, f"sft_accuracy.{skill}")
             for skill, value in summary.get("sft_accuracy_after", {}).items()]
    bpb = summary.get("stdlib_bits_per_byte")
    if bpb:
        rows.append(Row("sft", "stdlib bits per byte (5 unseen modules; lower is better)", bpb["pretrained"],
                        bpb["sft"], "stdlib_bpb_after_sft", fmt="num"))
    if "minutes" in summary:
        # no expected range: the seed study's runs share the machine, their minutes are not a speed figure
        rows.append(Row("quickstart", "minutes", None, summary["minutes"], fmt="num"))
    return rows


def _other_rows(run: Path) -> list[Row]:
    """Headline numbers of the other quickstarts, where they have run on this run directory since its main
    quickstart last finished (an older summary belongs to an SFT model that no longer exists)."""
    rows: list[Row] = []
    align = _read(run / "align" / "summary.json", after=run / "summary.json")
    if align:
        for method in ("grpo", "ppo", "dpo"):
            if "accuracy" in align.get(method, {}):
                rows.append(Row("align", f"{method.upper()} accuracy ({align.get('skill', '')}, vs SFT)",
                                align["sft_accuracy"], align[method]["accuracy"]))
    reason = _read(run / "reason" / "summary.json", after=run / "summary.json")
    if reason and "direct" in reason:
        rows.append(Row("reason", "greedy accuracy: direct answer -> thinking", reason["direct"]["greedy"],
                        reason["think_greedy"]))
        names = {"majority": "majority vote", "verifier": "verifier best-of-N", "rm": "reward-model best-of-N",
                 "pass": "pass@N (an oracle picks)"}
        for name, curve in reason.get("curves", {}).get("think", {}).items():
            if curve:
                rows.append(Row("reason", f"{names.get(name, name)}: N = {curve[0]['n']} -> {curve[-1]['n']}",
                                curve[0]["accuracy"], curve[-1]["accuracy"]))
    interp = _read(run / "interp" / "summary.json", after=run / "summary.json")
    if interp:
        lens = interp.get("logit_lens", {})
        if lens.get("answer_top1"):
            rows.append(Row("interp", "logit lens: answer is top-1, embedding -> final layer", lens["answer_top1"][0],
                            lens["answer_top1"][-1]))
        sae = interp.get("sae", {}).get("metrics", {})
        if "explained_variance" in sae:
            rows.append(Row("interp", "SAE explained variance", None, sae["explained_variance"]))
    vision = _read(run / "vision" / "summary.json", after=run / "summary.json")
    if vision and "accuracy" in vision:
        accuracy = vision["accuracy"]
        for key, name in (("llava", "Method A (LLaVA)"), ("cross_attention", "Method B (cross-attention)")):
            rows.append(Row("vision", f"VQA accuracy: text only -> {name} (chance {accuracy['chance']['all']:.0%})",
                            accuracy["text_only"]["all"], accuracy[key]["all"]))
    return rows


def _read(path: Path, after: Path | None = None) -> dict[str, Any] | None:
    """The JSON object at ``path``; None if it is missing, unreadable, or older than ``after``."""
    try:
        if after is not None and path.stat().st_mtime < after.stat().st_mtime:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _show(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if fmt == "pct":
        return f"{value:.1%}"
    return f"{value:,.2f}" if abs(value) < 1e4 else f"{value:,.0f}"


def _expected_text(row: Row) -> str:
    e = row.expected
    if e is None:
        return ""
    if row.fmt == "pct":
        text = f"{e['mean']:.1%} ± {e['sd']:.1%} ({e['low']:.1%}–{e['high']:.1%}, {e['runs']} runs)"
    else:
        text = f"{e['mean']:.2f} ± {e['sd']:.2f} ({e['low']:.2f}–{e['high']:.2f}, {e['runs']} runs)"
    return text + (" **outside**" if row.outside else "")


def report_card(run: str | Path, threads: int | None = None, expected_path: Path = EXPECTED) -> dict[str, Any]:
    """Build the card for ``run`` (a finished ``lmforge quickstart`` directory), write RUN/report.md and
    RUN/report.json, and return {"rows", "markdown", "outside"}. ``threads``: the run's thread count, for
    the expected ranges (default: the one its summary records)."""
    run = Path(run)
    summary = _read(run / "summary.json")
    if summary is None:
        from lmforge.errors import LmforgeError

        raise LmforgeError(f"{run / 'summary.json'} not found or unreadable: run `lmforge quickstart --out {run}`")
    threads = threads or summary.get("threads")
    expected = load_expected(threads, expected_path) if threads else {}
    rows = _main_rows(summary) + _other_rows(run)
    for row in rows:
        if row.key in expected:
            row.expected = expected[row.key]
    lines = [f"# Quickstart report card: {run}", "",
             f"Expected: mean ± sd (interval) over seeds at {threads} thread(s), from `python benchmarks/quickstart_seeds.py`"
             if expected else "No expected ranges for this thread count (run `python benchmarks/quickstart_seeds.py`).",
             "", "| stage | metric | before | after | expected (after) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r.stage} | {r.metric} | {_show(r.before, r.fmt)} | {_show(r.after, r.fmt)} | {_expected_text(r)} |"
              for r in rows]
    outside = [r.metric for r in rows if r.outside]
    if outside:
        lines += ["", f"Outside the expected range: {', '.join(outside)}."]
    markdown = "\n".join(lines) + "\n"
    with atomic_file(run / "report.md", "w") as f:
        f.write(markdown)
    card = {"run": str(run), "threads": threads, "rows": [asdict(r) for r in rows], "outside": outside}
    with atomic_file(run / "report.json", "w") as f:
        f.write(json.dumps(card, indent=2))
    return {**card, "markdown": markdown}
