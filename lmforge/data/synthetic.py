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


def _skill(kind: str, rng: random.Random) -> tuple[str, str, str]:
    """(prompt, assistant reply, answer) for one problem of ``kind``."""
    if kind == "next":
        a = rng.randint(0, 98)
        return f"What number comes after {a}?", f"{a + 1}", str(a + 1)
    if kind == "larger":
        a, b = rng.sample(range(100), 2)
        return f"Which is larger, {a} or {b}?", f"{max(a, b)}", str(max(a, b))
    if kind == "add1":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}", str(a + b)
    if kind == "add2":
        a, b = rng.randint(10, 50), rng.randint(10, 50)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}", str(a + b)
    raise ValueError(f"unknown skill {kind!r}")


SKILLS = ("next", "larger", "add1", "add2")


def skill_examples(n: int, seed: int, kinds: tuple[str, ...] = SKILLS) -> list[dict[str, Any]]:
    """A mix of small numeric skills of graded difficulty, each with one checkable integer answer:
    successor, the larger of two numbers, one-digit addition, two-digit addition (with carries)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        prompt, reply, answer = _skill(kind, rng)
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                    "answer": answer, "kind": kind})
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
