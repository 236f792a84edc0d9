"""GRPO step time: lmforge's GRPOTrainer vs TRL's GRPOTrainer, same model, prompts, reward and batch shape.

    python benchmarks/grpo_speed.py --model runs/quickstart/sft/checkpoints/step-00001500/model
    python benchmarks/grpo_speed.py --model PATH --steps 5 --prompts-per-step 16 --group-size 8 --rounds 2

Both sides: 16 prompts x 8 samples per step, at most 16 new tokens at temperature 1, one optimizer step per
rollout batch, KL weight 0.02, lr 1e-4, the exact-answer reward on "Which is larger, a or b?" problems,
float32 on CPU. Needs `pip install trl` (not an lmforge dependency; `--no-trl` times lmforge alone). The first
step of each side is a warm-up and is not timed. ``--rounds N`` alternates the sides N times (lmforge, TRL,
lmforge, TRL, ...) so a noisy machine slows both alike; medians are over every timed step of every round.

Per side it prints seconds per step split into
  generate  sampling the completions (lmforge: the paged engine; TRL: ``model.generate``), incl. tokenization;
  rollout   generate + rewards + advantages + the no-grad log-prob forwards (reference; old policy if any);
  update    the rest of the step: forward/backward/optimizer over the rollout (and lmforge's EMA reference step);
and completion tokens per second of generation time ("rollout tok/s") and of the whole step.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _timed(obj, name: str, into: list[float]) -> None:
    """Wrap the bound method ``obj.name`` so each call's wall time is appended to ``into``."""
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            into.append(time.perf_counter() - t0)

    setattr(obj, name, wrapper)


def run_lmforge(args, records, tmp: Path, steps: int) -> dict[str, list[float]]:
    from lmforge.align.grpo import GRPOConfig, GRPOTrainer
    from lmforge.align.rewards import exact_number_match
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model

    cfg = GRPOConfig(steps=steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                     max_new_tokens=args.max_new_tokens, temperature=1.0, lr=1e-4, beta=0.02, save_every=0,
                     progress=False, device="cpu")
    trainer = GRPOTrainer(load_model(args.model), load_tokenizer(args.model), records, exact_number_match, cfg,
                          tmp)
    gen: list[float] = []
    rollout: list[float] = []
    _timed(trainer, "sample", gen)
    _timed(trainer, "rollout", rollout)
    out: dict[str, list[float]] = {"step": [], "tokens": []}
    last = [time.perf_counter()]

    def on_step(step: int, record: dict) -> None:
        now = time.perf_counter()
        if step > 1:
            out["step"].append(now - last[0])
            out["tokens"].append(record["completion_len"] * args.prompts_per_step * args.group_size)
        last[0] = now

    trainer.fit(on_step=on_step)
    out["generate"], out["rollout"] = gen[1:], rollout[1:]
    return out


def run_trl(args, records, tmp: Path, steps: int) -> dict[str, list[float]]:
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    from lmforge.data.synthetic import extract_last_number

    def reward(completions, answer, **_):
        return [float(extract_last_number(c[0]["content"]) == a) for c, a in zip(completions, answer)]

    out: dict[str, list[float]] = {"step": [], "tokens": []}

    class Timer(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            now = time.perf_counter()
            if state.global_step > 1:
                out["step"].append(now - self.t)
            self.t = now

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs and state.global_step > 1:
                out["tokens"].append(logs["completions/mean_length"] * args.prompts_per_step * args.group_size)

    rows = args.prompts_per_step * args.group_size
    trl_args = TRLConfig(output_dir=str(tmp), per_device_train_batch_size=rows,
                         num_generations=args.group_size, max_completion_length=args.max_new_tokens,
                         learning_rate=1e-4, beta=0.02, temperature=1.0, max_steps=steps, logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, seed=0, loss_type="grpo",
                         lr_scheduler_type="constant", warmup_steps=0)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(args.model)
    hf_tok.padding_side = "left"
    data = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in records])
    trainer = TRLTrainer(model=hf_model, reward_funcs=reward, args=trl_args, train_dataset=data,
                         processing_class=hf_tok, callbacks=[Timer()])
    gen: list[float] = []
    rollout: list[float] = []
    _timed(trainer, "_generate", gen)
    _timed(trainer, "_generate_and_score_completions", rollout)
    trainer.train()
    out["generate"], out["rollout"] = gen[1:], rollout[1:]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory with tokenizer.json and a chat template")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1, help="alternate the two sides this many times")
    p.add_argument("--no-trl", action="store_true", help="time lmforge only")
    args = p.parse_args()

    from lmforge.data.synthetic import skill_examples

    records = [{"messages": r["messages"][:1], "answer": r["answer"]}
               for r in skill_examples(args.prompts_per_step * (args.steps + 1), seed=7, kinds=("larger",))]
    steps = args.steps + 1  # + warm-up
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-grpo-bench-"))
    load0 = os.getloadavg()
    sides = {"lmforge": run_lmforge} if args.no_trl else {"lmforge": run_lmforge, "TRL": run_trl}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in sides}
    for r in range(args.rounds):
        for name, fn in sides.items():
            got = fn(args, records, tmp / f"{name}-{r}", steps)
            for k, v in got.items():
                results[name].setdefault(k, []).extend(v)

    med = statistics.median
    print(f"\nGRPO, {args.prompts_per_step} prompts x {args.group_size} samples, <= {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps x {args.rounds} round(s) after a warm-up; "
          f"load average {load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end:")
    print(f"  {'':8} {'s/step':>7} {'generate':>9} {'rollout':>8} {'update':>7} {'rollout tok/s':>14} "
          f"{'step tok/s':>11}")
    summary = {}
    for name, res in results.items():
        step, gen, roll = med(res["step"]), med(res["generate"]), med(res["rollout"])
        # update = the rest of each step (paired per step, then the median)
        upd = med([s - r for s, r in zip(res["step"], res["rollout"])])
        tokens = med(res["tokens"]) if res["tokens"] else float("nan")
        summary[name] = step
        print(f"  {name:8} {step:7.2f} {gen:9.2f} {roll:8.2f} {upd:7.2f} {tokens / gen:14.0f} {tokens / step:11.0f}")
    if "TRL" in summary:
        print(f"  lmforge is {summary['TRL'] / summary['lmforge']:.2f}x faster per step")


if __name__ == "__main__":
    main()
