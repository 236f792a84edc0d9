"""Generated tasks with checkable answers: data that needs no download and a score that needs no judge."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from lmforge.io import atomic_file

_PROMPTS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Calculate {a} {op} {b}.")


def arithmetic_examples(n: int, seed: int, max_operand: int = 50, ops: str = "+-") -> list[dict[str, Any]]:
    """``n`` chat records {"messages": [user, assistant], "answer": "42"} of integer arithmetic.

    The assistant restates the problem before the result ("17 + 25 = 42"), a short worked format that a
    small model learns quickly and that a regex can score.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        prompt = rng.choice(_PROMPTS).format(a=a, b=b, op=op)
        out.append({"messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": f"{a} {op} {b} = {result}"}],
                    "answer": str(result)})
    return out


_NUMBER = re.compile(r"-?\d+")


def extract_last_number(text: str) -> str | None:
    """The last integer in ``text`` (the answer of the worked format), or None."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def exact_match_accuracy(completions: list[str], answers: list[str]) -> float:
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
    hits = sum(extract_last_number(c) == a for c, a in zip(completions, answers))
    return hits / max(len(answers), 1)


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path
