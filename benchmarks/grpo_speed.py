"""GRPO step time: lmforge's GRPOTrainer vs TRL's GRPOTrainer, same model, prompts, reward and batch shape.

    python benchmarks/grpo_speed.py --model runs/quickstart/sft/checkpoints/step-00001500/model
    python benchmarks/grpo_speed.py --model PATH --steps 5 --prompts-per-step 16 --group-size 8

Both sides: 16 prompts x 8 samples per step, at most 16 new tokens at temperature 1, one optimizer step per
rollout batch, KL weight 0.02, lr 1e-4, the exact-answer reward on "Which is larger, a or b?" problems,
float32 on CPU. Needs `pip install trl` (not an lmforge dependency). The first step of each side is a warm-up
and is not timed. Prints seconds per step and completion tokens per second of wall time for both, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory with tokenizer.json and a chat template")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args()

    from lmforge.align.grpo import GRPOConfig, GRPOTrainer
    from lmforge.align.rewards import exact_number_match
    from lmforge.data.synthetic import skill_examples
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model

    records = [{"messages": r["messages"][:1], "answer": r["answer"]}
               for r in skill_examples(args.prompts_per_step * (args.steps + 1), seed=7, kinds=("larger",))]
    steps = args.steps + 1  # + warm-up
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-grpo-bench-"))

    # lmforge
    cfg = GRPOConfig(steps=steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                     max_new_tokens=args.max_new_tokens, temperature=1.0, lr=1e-4, beta=0.02, save_every=0,
                     progress=False, device="cpu")
    ours_times: list[float] = []
    ours_tokens: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, record: dict) -> None:
        now = time.perf_counter()
        if step > 1:
            ours_times.append(now - last[0])
            ours_tokens.append(record["completion_len"] * args.prompts_per_step * args.group_size)
        last[0] = now

    trainer = GRPOTrainer(load_model(args.model), load_tokenizer(args.model), records, exact_number_match, cfg,
                          tmp / "lmforge")
    trainer.fit(on_step=on_step)

    # TRL
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    from lmforge.data.synthetic import extract_last_number

    def reward(completions, answer, **_):
        return [float(extract_last_number(c[0]["content"]) == a) for c, a in zip(completions, answer)]

    trl_times: list[float] = []
    trl_tokens: list[float] = []

    class Timer(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            now = time.perf_counter()
            if state.global_step > 1:
                trl_times.append(now - self.t)
            self.t = now

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs and state.global_step > 1:
                trl_tokens.append(logs["completions/mean_length"] * args.prompts_per_step * args.group_size)

    rows = args.prompts_per_step * args.group_size
    trl_args = TRLConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=rows,
                         num_generations=args.group_size, max_completion_length=args.max_new_tokens,
                         learning_rate=1e-4, beta=0.02, temperature=1.0, max_steps=steps, logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, seed=0, loss_type="grpo",
                         lr_scheduler_type="constant", warmup_steps=0)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(args.model)
    hf_tok.padding_side = "left"
    data = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in records])
    TRLTrainer(model=hf_model, reward_funcs=reward, args=trl_args, train_dataset=data, processing_class=hf_tok,
               callbacks=[Timer()]).train()

    ours_s, trl_s = statistics.median(ours_times), statistics.median(trl_times)
    print(f"\nGRPO, {args.prompts_per_step} prompts x {args.group_size} samples, <= {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps after a warm-up:")
    print(f"  lmforge  {ours_s:6.2f} s/step  {statistics.median(ours_tokens) / ours_s:7.0f} completion tok/s")
    trl_tok = f"{statistics.median(trl_tokens) / trl_s:7.0f} completion tok/s" if trl_tokens else ""
    print(f"  TRL      {trl_s:6.2f} s/step  {trl_tok}")
    print(f"  lmforge is {trl_s / ours_s:.2f}x faster per step")


if __name__ == "__main__":
    main()
