"""What `make quickstart` prints, over several seeds and thread counts: mean ± sd per figure.

Runs the whole `lmforge quickstart` pipeline once per (thread count, seed), each in its own process and run
directory, then writes the per-thread-count ranges to lmforge/quickstart/expected.json (which the quickstart
prints beside its own figures) and a Markdown table. Optionally re-runs one seed to check that a seeded run
at the same thread count reproduces every figure exactly.

    python benchmarks/quickstart_seeds.py                          # seeds 0 1 2 at 2 threads and at 1
    python benchmarks/quickstart_seeds.py --seeds 0 1 --threads 2  # fewer runs
    python benchmarks/quickstart_seeds.py --repeat                 # also re-run the first seed at each count

Runs of one thread go two at a time on a 2-core machine (``--jobs``); their wall-clock minutes are then not a
measure of the quickstart's speed (time it alone, on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmforge.quickstart.report import EXPECTED, headline_metrics, metric_bounds, spread  # noqa: E402


def run_one(out: Path, seed: int, threads: int, extra: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lmforge.cli", "quickstart", "--out", str(out), "--seed", str(seed),
           "--threads", str(threads), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with open(out / "quickstart.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        raise SystemExit(f"quickstart failed (exit {code}) for seed {seed}, {threads} thread(s): see {out / 'quickstart.log'}")
    summary = json.loads((out / "summary.json").read_text())
    print(f"  seed {seed}, {threads} thread(s): {(time.perf_counter() - started) / 60:.1f} min, "
          f"SFT accuracy {summary['sft_accuracy_after']['all']:.1%}", flush=True)
    return summary


def table(study: dict) -> str:
    counts = sorted(study["threads"], key=int)
    keys = list(next(iter(study["threads"].values()))["metrics"])
    head = "| figure | " + " | ".join(f"{t} thread(s): mean ± sd (min–max)" for t in counts) + " |"
    lines = [head, "| --- |" + " --- |" * len(counts)]
    for key in keys:
        cells = []
        for t in counts:
            m = study["threads"][t]["metrics"].get(key)
            if m is None:
                cells.append("")
                continue
            pct = key.startswith("sft_accuracy")
            f = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.2f}")
            values = study["threads"][t]["values"][key]
            cells.append(f"{f(m['mean'])} ± {f(m['sd'])} ({f(min(values))}–{f(max(values))})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--out", default="runs/quickstart_seeds")
    p.add_argument("--jobs", type=int, default=None, help="runs at once (default: cores // threads)")
    p.add_argument("--repeat", action="store_true", help="re-run the first seed at each thread count and compare")
    p.add_argument("--write", default=str(EXPECTED), help="where the ranges go ('' to skip)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further quickstart arguments")
    args = p.parse_args()

    out = Path(args.out)
    study: dict = {"command": "python benchmarks/quickstart_seeds.py " + " ".join(sys.argv[1:]),
                   "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "threads": {}}
    for threads in args.threads:
        jobs = args.jobs or max(1, (os.cpu_count() or 1) // threads)
        print(f"{len(args.seeds)} quickstart runs at {threads} thread(s), {jobs} at a time", flush=True)
        with ThreadPoolExecutor(jobs) as pool:
            summaries = list(pool.map(lambda s: run_one(out / f"t{threads}_s{s}", s, threads, args.extra), args.seeds))
        values: dict[str, list[float]] = {}
        for summary in summaries:
            for key, value in headline_metrics(summary).items():
                values.setdefault(key, []).append(value)
        entry = {"seeds": args.seeds, "precision": summaries[0].get("precision"),
                 "metrics": {k: spread(v, metric_bounds(k)) for k, v in values.items()}, "values": values}
        if args.repeat:
            again = run_one(out / f"t{threads}_s{args.seeds[0]}_repeat", args.seeds[0], threads, args.extra)
            first, second = headline_metrics(summaries[0]), headline_metrics(again)
            differ = [k for k in first if k != "minutes" and first[k] != second[k]]
            entry["repeat_identical"] = not differ
            print(f"  repeat of seed {args.seeds[0]} at {threads} thread(s): "
                  + ("every figure identical" if not differ else f"DIFFERS in {', '.join(differ)}"), flush=True)
        study["threads"][str(threads)] = entry
    print(table(study))
    if args.write:
        Path(args.write).write_text(json.dumps(study, indent=2) + "\n")
        print(f"ranges written to {args.write}")


if __name__ == "__main__":
    main()
