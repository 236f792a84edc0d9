"""Addition traces for ``quickstart-reason``: the generator, the answer parser and the process verifier."""

from __future__ import annotations

import pytest

from lmforge.data.synthetic import (
    addition_columns,
    addition_problems,
    addition_reason_examples,
    addition_trace,
    thinking_answer,
    verify_addition_trace,
)


def test_trace_columns_and_carries_by_hand():
    assert addition_trace(47, 85) == "7 + 5 = 12; 4 + 8 + 1 = 13; carry 1"
    assert addition_trace(347, 85) == "7 + 5 = 12; 4 + 8 + 1 = 13; 3 + 0 + 1 = 4"  # shorter operand padded with 0
    assert addition_trace(12, 34) == "2 + 4 = 6; 1 + 3 = 4"
    assert addition_trace(50, 50) == "0 + 0 = 0; 5 + 5 = 10; carry 1"
    assert addition_trace(999, 1) == "9 + 1 = 10; 9 + 0 + 1 = 10; 9 + 0 + 1 = 10; carry 1"
    assert addition_columns(47, 85) == [(7, 5, 0, 12), (4, 8, 1, 13)]
    # A slip: column 1 is off by one and the next column follows from its (wrong) carry.
    assert addition_trace(347, 285, wrong_column=1) == "7 + 5 = 12; 4 + 8 + 1 = 14; 3 + 2 + 1 = 6"
    assert addition_trace(99, 99, wrong_column=1) == "9 + 9 = 18; 9 + 9 + 1 = 18; carry 1"  # 19 -> 18, still a column sum


def test_problems_are_distinct_disjoint_and_of_the_asked_lengths():
    test = addition_problems(300, seed=1)
    train = addition_problems(2000, seed=2, exclude=set(test))
    assert len(set(test)) == 300 and len(set(train)) == 2000 and not set(test) & set(train)
    assert all(10 <= x <= 999 for p in test + train for x in p)
    lengths = [len(str(x)) for p in train for x in p]
    assert 0.4 < lengths.count(2) / len(lengths) < 0.6  # digit counts drawn uniformly, not values
    assert addition_problems(5, seed=3) == addition_problems(5, seed=3)
    with pytest.raises(ValueError):
        addition_problems(101, seed=0, min_digits=1, max_digits=1)  # only 10 * 10 one-digit pairs exist
    assert len(addition_problems(100, seed=0, min_digits=1, max_digits=1)) == 100


def test_records_direct_and_think():
    problems = [(47, 85), (12, 34)]
    direct = addition_reason_examples(problems, "direct")
    assert direct[0]["messages"] == [{"role": "user", "content": "What is 47 + 85?"},
                                     {"role": "assistant", "content": "132"}]
    think = addition_reason_examples(problems, "think")
    assert think[0]["messages"][1]["content"] == "<think>7 + 5 = 12; 4 + 8 + 1 = 13; carry 1</think>132"
    assert think[1]["answer"] == "46" and (think[1]["a"], think[1]["b"]) == (12, 34)
    waits = addition_reason_examples(addition_problems(400, seed=0), "think", seed=0, wait_fraction=1.0,
                                     slip_fraction=0.5)
    replies = [r["messages"][1]["content"] for r in waits]
    assert all(r.count("Wait, ") == 1 for r in replies)
    slipped = [r for r in replies if r.split("Wait, ")[0].removeprefix("<think>") != r.split("Wait, ")[1].split("</think>")[0]]
    assert 0.35 < len(slipped) / len(replies) < 0.65
    # Whatever pass 1 says, pass 2 and the answer are right, so every record verifies against its problem.
    for r in waits:
        assert verify_addition_trace(r["messages"][1]["content"], r["messages"][0]["content"]) == 1.0
    with pytest.raises(ValueError):
        addition_reason_examples(problems, "cot")


def test_thinking_answer():
    assert thinking_answer("<think>7 + 5 = 12; 4 + 8 + 1 = 13; carry 1</think>132") == "132"
    assert thinking_answer("<think>7 + 5 = 12; 4 + 8 + 1 = 13") is None  # never closed: no answer
    assert thinking_answer("<think>1 + 1 = 2</think>") is None


@pytest.mark.parametrize("completion, ok", [
    ("<think>7 + 5 = 12; 4 + 8 + 1 = 13; carry 1</think>132", 1.0),
    ("<think>7 + 5 = 12; 4 + 8 + 1 = 13; carry 1</think>133", 0.0),  # the answer does not follow from the trace
    ("<think>7 + 5 = 13; 4 + 8 + 1 = 14; carry 1</think>143", 0.0),  # a column sum is wrong
    ("<think>7 + 5 = 12; 4 + 8 = 12; carry 1</think>122", 0.0),  # the carry was dropped
    ("<think>7 + 5 = 12; 4 + 8 + 1 = 13</think>32", 0.0),  # the final carry was dropped
    ("<think>2 + 4 = 6; 1 + 3 + 1 = 5</think>56", 0.0),  # a carry-in that no column produced
    ("<think>7 + 5 = 12; 4 + 8 + 1 = 13; carry 1</think>", 0.0),  # no answer
    ("<think>7 + 5 = 12; 4 + 8 + 1 = 13; carry 1", 0.0),  # thinking never closed
    ("7 + 5 = 12; 4 + 8 + 1 = 13; carry 1</think>132", 0.0),  # never opened
    ("<think>7 + 5 = 12; 4 + 8 + 1 = 13; carry 1</think>132</think>132", 0.0),
    ("<think>7 + 5 = 12;4 + 8 + 1 = 13; carry 1</think>132", 0.0),  # malformed separator
    ("<think></think>132", 0.0),
    ("<think>7 + 5 = 12; 4 + 8 + 1 = 13; carry 1</think>the answer is 132", 0.0),  # the answer must be the number alone
    ("<think>7 + 5 = 12; 4 + 8 + 1 = 14; carry 1Wait, 7 + 5 = 12; 4 + 8 + 1 = 13; carry 1</think>132", 1.0),  # the last pass counts
    ("<think>7 + 5 = 12; 4 + 8 + 1 = 13; carry 1Wait, 7 + 5 = 12; 4 + 8 + 1 = 14; carry 1</think>132", 0.0),
    ("<think>7 + 5 = 12; 4 + 8 + 1 = 13; carry 1Wait, </think>132", 0.0),
])
def test_process_verifier(completion, ok):
    assert verify_addition_trace(completion) == ok


def test_process_verifier_with_the_prompt_checks_the_digits_read():
    good = "<think>7 + 5 = 12; 4 + 8 + 1 = 13; carry 1</think>132"
    assert verify_addition_trace(good, "What is 47 + 85?") == 1.0
    assert verify_addition_trace(good, "What is 47 + 86?") == 0.0  # consistent arithmetic, misread digit
    padded = "<think>7 + 5 = 12; 4 + 0 + 1 = 5; 3 + 0 = 3</think>352"
    assert verify_addition_trace(padded, "What is 347 + 5?") == 1.0  # the short operand's columns read 0
    assert verify_addition_trace(padded, "What is 5 + 347?") == 0.0  # operands swapped: digits read wrong
    assert verify_addition_trace(padded, "What is 347 + 6?") == 0.0
    assert verify_addition_trace(good, "no numbers here") == 0.0
    # The verifier agrees with the truth on every generated record of both lengths.
    for r in addition_reason_examples(addition_problems(500, seed=4), "think"):
        assert verify_addition_trace(r["messages"][1]["content"], r["messages"][0]["content"]) == 1.0
        assert thinking_answer(r["messages"][1]["content"]) == r["answer"]
