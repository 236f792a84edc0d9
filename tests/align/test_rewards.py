"""Verifiable reward functions and the safe wrapper that turns failures into reported skips."""

from __future__ import annotations

import logging
import math

import pytest

from lmforge.align.rewards import combine, exact_number_match, format_reward, safe_reward
from lmforge.errors import LmforgeError


def test_exact_number_match_uses_the_last_number():
    assert exact_number_match("17 + 25 = 42", "42") == 1.0
    assert exact_number_match("42 is not it, the answer is 41", "42") == 0.0
    assert exact_number_match("so 3 - 10 = -7", "-7") == 1.0
    assert exact_number_match("007", "#### 7") == 1.0
    assert exact_number_match("no digits here", "5") == 0.0
    with pytest.raises(LmforgeError, match="no number"):
        exact_number_match("5", "five")


def test_format_reward_search_and_full_match():
    think = format_reward(r"<think>.*</think>\s*\S.*")
    assert think("<think>a\nb</think> 42", "") == 1.0
    assert think("42", "") == 0.0
    strict = format_reward(r"\d+", full_match=True)
    assert strict("123", "") == 1.0 and strict("x123", "") == 0.0
    assert format_reward(r"\d+")("x123", "") == 1.0
    with pytest.raises(LmforgeError, match="not a valid regex"):
        format_reward("(unclosed")


def test_combine_weights_rewards():
    fn = combine((exact_number_match, 1.0), (format_reward(r"= -?\d+$"), 0.25))
    assert fn("2 + 2 = 4", "4") == 1.25
    assert fn("2 + 2 = 5", "4") == 0.25
    assert fn("4!", "4") == 1.0
    with pytest.raises(LmforgeError, match="finite"):
        combine((exact_number_match, math.nan))
    with pytest.raises(LmforgeError, match="pair"):
        combine(exact_number_match)


def test_safe_reward_passes_good_values_through():
    assert safe_reward(exact_number_match, "= 4", "4") == (1.0, None)
    assert safe_reward(lambda c, r: True, "", "") == (1.0, None)


def test_safe_reward_skips_raising_nan_inf_and_non_numbers_with_a_reason(caplog):
    def broken(completion: str, reference: str) -> float:
        raise RuntimeError("sandbox crashed")

    def nan_reward(completion: str, reference: str) -> float:
        return math.nan

    with caplog.at_level(logging.WARNING, logger="lmforge.align.rewards"):
        value, reason = safe_reward(broken, "x", "y")
        assert value is None and "broken raised RuntimeError: sandbox crashed" in reason
        value, reason = safe_reward(nan_reward, "x", "y")
        assert value is None and "nan_reward returned nan" in reason
        assert safe_reward(lambda c, r: math.inf, "", "").value is None
        value, reason = safe_reward(lambda c, r: "1.0", "", "")
        assert value is None and "not a number" in reason
        # A NaN inside a combination is not averaged away.
        value, reason = safe_reward(combine((nan_reward, 0.5), (exact_number_match, 1.0)), "4", "4")
        assert value is None and "nan" in reason
        # A reference without a number is a data problem: skipped, not scored 0.
        assert safe_reward(exact_number_match, "4", "four").value is None
    assert sum("skipping sample" in r.getMessage() for r in caplog.records) == 6
