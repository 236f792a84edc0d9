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


# ---- multi-digit addition with step-by-step traces (``lmforge quickstart-reason``) ----------------------
THINK_START, THINK_END = "<think>", "</think>"
WAIT = "Wait"  # s1's extension word: in traces it starts a fresh re-derivation of the columns


def addition_problems(n: int, seed: int, min_digits: int = 2, max_digits: int = 3,
                      exclude: set[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """``n`` distinct (a, b) pairs not in ``exclude``. Each operand first draws its digit count uniformly from
    ``min_digits..max_digits`` and then a value of that length, so short operands are as common as long ones
    (uniform values would make almost every operand ``max_digits`` long)."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    space = sum(10 if d == 1 else 9 * 10 ** (d - 1) for d in range(min_digits, max_digits + 1)) ** 2  # 1 digit: 0-9
    if n > space - len(seen):
        raise ValueError(f"asked for {n} problems; only {space - len(seen)} are left with these digit counts")
    out: list[tuple[int, int]] = []
    while len(out) < n:
        a, b = (rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)
                for d in (rng.randint(min_digits, max_digits), rng.randint(min_digits, max_digits)))
        if (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def addition_columns(a: int, b: int) -> list[tuple[int, int, int, int]]:
    """Right-to-left columns (x, y, carry_in, sum) of ``a + b``; the shorter operand is padded with 0s."""
    da, db = str(a)[::-1], str(b)[::-1]
    cols, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        cols.append((x, y, carry, s))
        carry = s // 10
    return cols


def addition_trace(a: int, b: int, wrong_column: int | None = None) -> str:
    """The column-by-column derivation of ``a + b``, right to left, e.g. 47 + 85:
    ``7 + 5 = 12; 4 + 8 + 1 = 13; carry 1``. A column's carry-in is written as ``+ 1``; a column writes its sum's
    last digit and carries its tens digit; a final carry is written as ``carry 1``. The answer is the written
    digits, last first (132). Each column is spelled as the quickstart's SFT data spells one-digit addition
    ("7 + 5 = 12"), so a model finetuned from that checkpoint already knows every step; and it is short (about
    11 tokens a column): every trace token costs training and sampling time on a CPU.

    ``wrong_column``: that column's sum is off by one (and the columns after it follow from the wrong carry),
    the kind of slip a re-derivation after "Wait" corrects.
    """
    parts, carry = [], 0
    for i, (x, y, _, _) in enumerate(addition_columns(a, b)):
        s = x + y + carry
        if i == wrong_column:
            s = s + 1 if s < 18 else s - 1  # stays a possible column sum (0..19)
        parts.append(f"{x} + {y}{' + 1' if carry else ''} = {s}")
        carry = s // 10
    if carry:
        parts.append("carry 1")
    return "; ".join(parts)


def _trace_answer(sums: list[int], final_carry: bool) -> str:
    """The number a trace with these column sums writes (last digits, last column first)."""
    return (("1" if final_carry else "") + "".join(str(s % 10) for s in reversed(sums))).lstrip("0") or "0"


def addition_reason_examples(problems: list[tuple[int, int]], style: str, seed: int = 0,
                             wait_fraction: float = 0.0, slip_fraction: float = 0.5) -> list[dict[str, Any]]:
    """Chat records for ``problems``: "What is a + b?" answered either ``direct`` (the sum only) or ``think``
    (``<think>trace</think>sum``).

    ``wait_fraction`` of the think records derive the columns twice, ``<think>pass 1Wait, pass 2</think>``:
    "Wait" follows the first pass directly because budget forcing puts it exactly where the model chose
    ``</think>``. In ``slip_fraction`` of those, pass 1 has one column off by one and pass 2 is right, so after
    "Wait" a model learns to re-derive the columns from the problem rather than copy pass 1 (the answer is
    always pass 2's). Records carry "answer" (the true sum) and the operands "a", "b".
    """
    if style not in ("think", "direct"):
        raise ValueError(f"style must be 'think' or 'direct', got {style!r}")
    rng = random.Random(seed)
    out = []
    for a, b in problems:
        answer = str(a + b)
        if style == "direct":
            reply = answer
        else:
            trace = addition_trace(a, b)
            if rng.random() < wait_fraction:
                slip = rng.randrange(len(addition_columns(a, b))) if rng.random() < slip_fraction else None
                trace = f"{addition_trace(a, b, slip)}{WAIT}, {trace}"
            reply = f"{THINK_START}{trace}{THINK_END}{answer}"
        out.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                 {"role": "assistant", "content": reply}],
                    "answer": answer, "a": a, "b": b})
    return out


_COLUMN = re.compile(r"(\d) \+ (\d)( \+ 1)? = (\d{1,2})")
_ADDITION_PROMPT = re.compile(r"(\d+)\s*\+\s*(\d+)")


def thinking_answer(completion: str) -> str | None:
    """The answer of a thinking completion: the last integer after its last ``</think>``; None when thinking
    never closed (the reply never got to an answer) or no number follows."""
    if THINK_END not in completion:
        return None
    return extract_last_number(completion.rsplit(THINK_END, 1)[1])


def verify_addition_trace(completion: str, prompt: str | None = None) -> float:
    """Process verifier for a thinking completion of an addition problem: 1.0 when its last derivation (what
    follows the last "Wait", if any) is well formed and self-consistent and the answer after ``</think>`` is the
    number it writes; else 0.0. It does NOT know the true sum.

    Checked: every column's sum is its two digits plus its carry-in, a carry-in (``+ 1``) appears exactly when
    the previous column's sum is >= 10 (never in the first column), a final carry is written (``carry 1``)
    exactly when the last sum is >= 10, and the answer is the sums' last digits, last column first. With ``prompt`` ("What is a + b?") the
    column digits must also be a's and b's, right to left; without it a trace that copied a wrong digit from
    the problem but added consistently passes (the verifier then checks the arithmetic, not the reading).
    """
    if completion.count(THINK_END) != 1 or THINK_START not in completion.split(THINK_END)[0]:
        return 0.0
    thinking, after = completion.split(THINK_END)
    thinking = thinking.split(THINK_START, 1)[1]
    last_pass = thinking.rsplit(WAIT, 1)[1].removeprefix(", ") if WAIT in thinking else thinking
    chunks = last_pass.split("; ")
    final_carry = chunks[-1] == "carry 1"
    if final_carry:
        chunks = chunks[:-1]
    columns = [_COLUMN.fullmatch(c) for c in chunks]
    if not columns or any(m is None for m in columns):
        return 0.0
    carry, digits, sums = 0, [], []
    for m in columns:
        x, y, cin, s = int(m[1]), int(m[2]), int(bool(m[3])), int(m[4])
        if cin != carry or s != x + y + cin or str(s) != m[4]:  # "= 05" is not a sum this format writes
            return 0.0
        digits.append((x, y))
        sums.append(s)
        carry = s // 10
    if final_carry != bool(carry):
        return 0.0
    if prompt is not None:
        found = _ADDITION_PROMPT.search(prompt)
        if found is None:
            return 0.0
        a, b = found[1][::-1], found[2][::-1]
        want = [(int(a[i]) if i < len(a) else 0, int(b[i]) if i < len(b) else 0) for i in range(max(len(a), len(b)))]
        if digits != want:
            return 0.0
    answer = extract_last_number(after)
    return float(answer is not None and after.strip() == answer and answer == _trace_answer(sums, final_carry))
