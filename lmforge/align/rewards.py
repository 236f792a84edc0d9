"""Verifiable rewards: plain callables ``(completion: str, reference: str) -> float``.

They score what a program can check (a final number, a required format) so RL needs no reward model.
Call them through ``safe_reward``: a reward function that raises, or returns NaN/inf, must make the
trainer skip that sample and say why, not feed a corrupt value into the advantages.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Callable
from typing import NamedTuple

from lmforge.data.synthetic import extract_last_number
from lmforge.errors import LmforgeError

RewardFn = Callable[[str, str], float]

logger = logging.getLogger(__name__)


def exact_number_match(completion: str, reference: str) -> float:
    """1.0 when the last integer in ``completion`` equals the reference answer, else 0.0.

    The reference may be a bare number ("42") or text ending in one ("#### 42"); numbers compare as
    integers so "007" matches "7". A reference without a number is a data error and raises.
    """
    want = extract_last_number(reference)
    if want is None:
        raise LmforgeError(f"reference {reference!r} holds no number to compare against")
    got = extract_last_number(completion)
    return float(got is not None and int(got) == int(want))


def format_reward(pattern: str, full_match: bool = False, flags: int = re.DOTALL) -> RewardFn:
    """A reward of 1.0 when ``completion`` matches ``pattern`` (``re.search``, or ``re.fullmatch`` with
    ``full_match``), else 0.0. The reference is ignored. ``re.DOTALL`` by default because completions
    span lines. The pattern is compiled here, so a bad one fails before training starts."""
    try:
        regex = re.compile(pattern, flags)
    except re.error as e:
        raise LmforgeError(f"format_reward pattern {pattern!r} is not a valid regex: {e}") from None
    match = regex.fullmatch if full_match else regex.search

    def reward(completion: str, reference: str) -> float:
        return 1.0 if match(completion) else 0.0

    reward.__name__ = f"format_reward({pattern!r})"
    return reward


def combine(*weighted: tuple[RewardFn, float]) -> RewardFn:
    """The weighted sum ``sum_i w_i * fn_i(completion, reference)`` of ``(fn, weight)`` pairs."""
    if not weighted:
        raise LmforgeError("combine() needs at least one (reward_fn, weight) pair")
    pairs = []
    for i, item in enumerate(weighted):
        if not (isinstance(item, tuple) and len(item) == 2 and callable(item[0])):
            raise LmforgeError(f"combine() argument {i} must be a (reward_fn, weight) pair, got {item!r}")
        fn, weight = item
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise LmforgeError(f"combine() weight for {_name(fn)} must be a finite number, got {weight!r}")
        pairs.append((fn, float(weight)))

    def reward(completion: str, reference: str) -> float:
        # A NaN from one part propagates on purpose, so safe_reward sees it and skips the sample.
        return sum(w * float(fn(completion, reference)) for fn, w in pairs)

    reward.__name__ = "combine(" + ", ".join(f"{_name(fn)}*{w:g}" for fn, w in pairs) + ")"
    return reward


class RewardOutcome(NamedTuple):
    """``value`` is the reward, or None when the sample must be skipped; ``reason`` says why."""

    value: float | None
    reason: str | None


def safe_reward(fn: RewardFn, completion: str, reference: str) -> RewardOutcome:
    """Call ``fn``; return ``(value, None)``, or ``(None, reason)`` (logged as a warning) when it raised,
    returned a non-number, or returned NaN/inf. Bools count as numbers (True -> 1.0)."""
    name = _name(fn)
    try:
        value = fn(completion, reference)
    except Exception as e:  # noqa: BLE001 - any failure of user code becomes a reported skip
        return _skip(f"{name} raised {type(e).__name__}: {e}")
    if not isinstance(value, numbers.Real):
        return _skip(f"{name} returned {type(value).__name__} {value!r}, not a number")
    value = float(value)
    if not math.isfinite(value):
        return _skip(f"{name} returned {value}")
    return RewardOutcome(value, None)


def _skip(reason: str) -> RewardOutcome:
    logger.warning("skipping sample: %s", reason)
    return RewardOutcome(None, reason)


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


__all__ = ["RewardFn", "RewardOutcome", "combine", "exact_number_match", "format_reward", "safe_reward"]
