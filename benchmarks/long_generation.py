"""Per-token cost across one long generation through the engine: does anything grow with the output length?

    python benchmarks/long_generation.py             # 2,000 tokens, ~27M-parameter Llama, real BPE tokenizer
    python benchmarks/long_generation.py --quick     # 400 tokens, smoke run

One request, greedy, with a stop string that never matches, so the engine detokenizes and searches for the
stop string after every token, as the server does. Prints the mean milliseconds per token near the start and
near the end of the output, split into the engine step (model forward, KV gathers, scheduling) and the stop
check (detokenization + stop-string search, timed around ``Engine._check_stop``), and their end/start ratios.
Attention over a longer context is a real, linear cost of the model; the stop check should not grow at all.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def stdlib_text(limit_bytes: int = 2_000_000) -> list[str]:
    files, total = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        files.append(path)
        total += os.path.getsize(path)
        if total > limit_bytes:
            break
    return files


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--window", type=int, default=200, help="tokens averaged at each end")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.layers, args.vocab, args.window = 400, 128, 2, 2048, 50
    if args.threads:
        torch.set_num_threads(args.threads)

    from lmforge.data.tokenizer import load_tokenizer, train_bpe_tokenizer
    from lmforge.models.config import Config
    from lmforge.models.model import Transformer
    from lmforge.serve import Engine, SamplingParams

    tmp = Path(tempfile.mkdtemp(prefix="lmforge-long-gen-"))
    train_bpe_tokenizer(stdlib_text(), vocab_size=args.vocab).save(tmp)
    tokenizer = load_tokenizer(tmp)
    cfg = Config.from_hf(dict(model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=args.hidden,
                              intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                              num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                              max_position_embeddings=args.tokens + 64))
    torch.manual_seed(0)
    model = Transformer(cfg).init_weights(seed=0).eval()
    engine = Engine(model, tokenizer)

    stop_seconds: list[float] = []
    check = engine._check_stop

    def timed_check(seq, token):
        t0 = time.perf_counter()
        try:
            return check(seq, token)
        finally:
            stop_seconds.append(time.perf_counter() - t0)

    engine._check_stop = timed_check
    prompt = tokenizer.encode("def main(argv=None):\n    ")
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True,
                                              stop=["\x00never\x00"]))
    step_seconds: list[float] = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        step_seconds.append(time.perf_counter() - t0)
    step_seconds = step_seconds[1:]  # the first step is the prefill
    stop_seconds = stop_seconds[1:]
    w = args.window
    print(f"{args.tokens} tokens, hidden {args.hidden} x {args.layers} layers, vocab {tokenizer.vocab_size}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'ms per token':<32}{'tokens 1-' + str(w):>14}{'last ' + str(w):>14}{'end / start':>14}")
    for name, xs in (("engine step (incl. stop check)", step_seconds), ("stop check only", stop_seconds)):
        # Medians over the window: robust to a stray scheduler hiccup on a shared machine.
        a, b = statistics.median(xs[:w]) * 1e3, statistics.median(xs[-w:]) * 1e3
        print(f"{name:<32}{a:>14.3f}{b:>14.3f}{b / a:>13.2f}x")


if __name__ == "__main__":
    main()
