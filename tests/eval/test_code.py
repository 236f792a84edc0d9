"""pass@k on hand values; the sandbox scores runaway programs as failed and keeps going."""

from __future__ import annotations

import json
from math import comb

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.code import build_program, extract_code, pass_at_k, run_program, run_programs
from lmforge.eval.tasks import builtin_tasks


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every pair holds a pass
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    with pytest.raises(LmforgeError):
        pass_at_k(3, 4, 1)


def test_sandbox_scores_bad_programs_failed_and_continues():
    sources = {
        "loop": "while True:\n    pass\n",
        "memory": "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n",
        "socket": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n",
        "dns": "import socket\nsocket.getaddrinfo('example.com', 80)\n",
        "subprocess": "import subprocess\nsubprocess.run(['true'])\n",
        "raise_limit": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
        "flood": "while True:\n    print('x' * 10000)\n",
        "wrong": "assert 1 + 1 == 3\n",
        "ok": "def f(x):\n    return x * 2\nassert f(2) == 4\n",
    }
    results = dict(zip(sources, run_programs(list(sources.values()), timeout_s=5, memory_mb=256, workers=2)))
    assert results["ok"].passed
    assert all(not r.passed for name, r in results.items() if name != "ok")
    assert results["loop"].status == "timeout"
    assert results["memory"].status == "memory"
    for name in ("socket", "dns", "subprocess", "raise_limit"):
        assert results[name].status == "blocked", (name, results[name])
    assert run_program("print('after all that')").passed  # still working


def test_builtin_code_task_canonical_solutions_pass():
    path = builtin_tasks()["code"].with_name("code.jsonl")
    problems = [json.loads(line) for line in path.read_text().splitlines()]
    programs = [build_program(p["prompt"], p["canonical_solution"], p["tests"]) for p in problems]
    programs.append(build_program(problems[0]["prompt"], "    return None\n", problems[0]["tests"]))
    results = run_programs(programs, timeout_s=5)
    assert [r.passed for r in results] == [True] * len(problems) + [False]


PROMPT = 'from math import prod\n\n\ndef add(a, b):\n    """Return the sum of a and b."""\n'
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
WHOLE = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("completion,code", [
    ("    return a + b\n", "    return a + b\n"),  # no fence: the completion itself
    (f"```python\n{WHOLE}```", WHOLE),
    (f"Here is the function:\n\n```py\n{WHOLE}```\n\nIt adds the numbers.", WHOLE),
    (f"Sure:\n```\n{WHOLE}```\nUsage:\n```python\nprint(add(1, 2))\n```", WHOLE),  # untagged first block
    (f"```text\nadd\n```\n```python\n{WHOLE}```", WHOLE),  # the python block, not the text one
    (f"```python\n{WHOLE}", WHOLE),  # generation stopped inside the block
    ("    return a + b\n```\n\nThis returns the sum.", "    return a + b\n"),  # a fence closing the body
])
def test_extract_code_from_markdown_fences(completion, code):
    assert extract_code(completion) == code


def test_fenced_answers_are_scored_on_their_code():
    """A chat model answers in a ```python fence: whole function or body, with prose around it."""
    good = [f"```python\n{WHOLE}```",
            f"Here you go:\n\n```python\n{WHOLE}```\n\nThis uses `+`.",
            "```python\n    return a + b\n```",  # just the body, fenced
            "    return a + b\n```\nDone.",
            "```python\ndef add(a, b):\n    return prod([1]) * (a + b)\n```"]  # needs the prompt's import
    bad = ["```python\ndef add(a, b):\n    return a - b\n```", "The answer is a + b."]
    # without a fence the program is exactly prompt + completion, as before
    assert build_program(PROMPT, "    return a + b\n", TESTS) == f"{PROMPT}    return a + b\n\n\n{TESTS}\n"
    results = run_programs([build_program(PROMPT, c, TESTS) for c in good + bad], timeout_s=5)
    assert [r.passed for r in results] == [True] * len(good) + [False] * len(bad), [r.detail for r in results]
    # a prompt the whole definition cannot follow (it ends inside the body) is replaced by it
    assert build_program("def add(a, b):\n    return (", f"```python\n{WHOLE}```", TESTS).startswith(WHOLE)
