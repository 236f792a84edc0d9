"""Budget forcing (s1, Muennighoff et al. 2025): bounds on how long a reasoning model thinks.

A model thinks between two delimiters (``<think>`` ... ``</think>`` by default). Per request:
  - ``max_tokens`` (the cap): once thinking has taken that many tokens, the end delimiter is forced next
    (then an optional answer prefix, e.g. "Final Answer:"), so the end delimiter sits exactly after
    ``max_tokens`` thinking tokens. A model that never closes its thinking is closed here.
  - ``min_tokens``: below it, the model's choice of the end delimiter is replaced by the extension
    ("Wait"), so it keeps thinking; the s1 recipe.

This is the one definition of the rule; ``generate`` and the serving engine both run it through
``ThinkingState.advance``, so they append the same tokens. Counting is in tokens: every token generated
while thinking is open counts (the extension too; the delimiters do not), tokens of the prompt do not. Thinking
is open when the output opens it, or already at the start when the prompt's last start delimiter comes after
its last end delimiter (chat templates of reasoning models often end the generation prompt with ``<think>``).
The counts add up over every thinking span of one output: a model that opens thinking again after the cap
is closed again at once.

Forced tokens are appended without sampling. Delimiters are token sequences; from a tokenizer each must be one
token of its vocabulary (``ThinkingBudget.from_tokenizer``), which is what reasoning models ship. With a
multi-token end delimiter, suppression below the minimum acts on its first token (the model's first step
towards closing), and the cap forces only what is missing of a partly written delimiter.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Sequence

from lmforge.errors import LmforgeError

DEFAULT_DELIMITERS: tuple[str, str] = ("<think>", "</think>")
DEFAULT_EXTENSION = "Wait"


def check_budget_numbers(min_tokens: int, max_tokens: int | None, new_tokens: int | None = None,
                         new_tokens_name: str = "max_tokens") -> None:
    """The numeric rules of a budget, shared by ``SamplingParams`` (before any tokenizer is at hand) and
    ``ThinkingBudget``: non-negative ints, min <= max, and both below the output's own limit ``new_tokens``
    (a cap at or past it could never leave room for the answer, a minimum there could never end)."""
    for name, value in (("min_thinking_tokens", min_tokens), ("max_thinking_tokens", max_tokens)):
        if value is None and name == "max_thinking_tokens":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LmforgeError(f"{name} must be an integer >= 0, got {value!r}")
    if max_tokens is not None and min_tokens > max_tokens:
        raise LmforgeError(f"min_thinking_tokens ({min_tokens}) is larger than max_thinking_tokens ({max_tokens}); "
                           "the minimum must not exceed the cap")
    if new_tokens is not None:
        for name, value in (("max_thinking_tokens", max_tokens), ("min_thinking_tokens", min_tokens)):
            if value is not None and value and value >= new_tokens:
                raise LmforgeError(f"{name} ({value}) must be below {new_tokens_name} ({new_tokens}): "
                                   f"{new_tokens_name} bounds the whole output, thinking and answer; raise "
                                   f"{new_tokens_name} or lower {name}")


def _ends_with(seq: list[int], suffix: tuple[int, ...]) -> bool:
    return len(seq) >= len(suffix) and tuple(seq[len(seq) - len(suffix):]) == suffix


def _last_index(seq: Sequence[int], sub: tuple[int, ...]) -> int:
    """Start of the last occurrence of ``sub`` in ``seq``; -1 if none. Prompts can be long and this runs per
    request on the engine's thread: candidates (the delimiter's last token) are found by ``list.index`` over
    the reversed prompt, in C, not by a Python loop over every position."""
    seq = list(seq)
    rev, n, pos = seq[::-1], len(sub), 0
    while True:
        try:
            j = rev.index(sub[-1], pos)
        except ValueError:
            return -1
        stop = len(seq) - j  # the candidate occurrence ends just before this index
        if stop >= n and tuple(seq[stop - n:stop]) == sub:
            return stop - n
        pos = j + 1


def _lookup(tokenizer: Any) -> Any:
    """The tokenizer's token -> id lookup (lmforge's ``Tokenizer`` keeps it on its Rust backend)."""
    for obj in (tokenizer, getattr(tokenizer, "backend", None)):
        fn = getattr(obj, "token_to_id", None)
        if callable(fn):
            return fn
    raise LmforgeError(f"budget forcing needs a tokenizer that can look up tokens (token_to_id); "
                       f"{type(tokenizer).__name__} cannot")


def _encode(tokenizer: Any, text: str) -> list[int]:
    """``text`` as ids without the tokenizer's automatic specials (no BOS in the middle of an output)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a stand-in tokenizer without the keyword
        return list(tokenizer.encode(text))


@dataclass(frozen=True)
class ThinkingBudget:
    """The budget of one request, as token ids. ``max_tokens`` None: no cap; ``min_tokens`` 0: no minimum."""

    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    min_tokens: int = 0
    max_tokens: int | None = None
    extension_ids: tuple[int, ...] = ()
    answer_prefix_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("start_ids", "end_ids", "extension_ids", "answer_prefix_ids"):
            value = tuple(int(t) for t in getattr(self, name))
            if any(t < 0 for t in value):
                raise LmforgeError(f"{name} must be token ids (>= 0), got {value}")
            object.__setattr__(self, name, value)
        if not self.start_ids or not self.end_ids:
            raise LmforgeError("the thinking delimiters must each be at least one token")
        if self.start_ids == self.end_ids:
            raise LmforgeError(f"the start and end thinking delimiters are the same tokens {self.start_ids}")
        check_budget_numbers(self.min_tokens, self.max_tokens)
        if self.min_tokens and not self.extension_ids:
            raise LmforgeError("min_thinking_tokens needs a non-empty extension (e.g. 'Wait') to insert in place "
                               "of an early end delimiter")
        if self.end_ids[0] in self.extension_ids:
            # The extension replaces the end delimiter's first token; containing it would close thinking anyway.
            raise LmforgeError(f"the thinking extension must not contain the end delimiter's token "
                               f"{self.end_ids[0]}")
        if _last_index((*self.end_ids, *self.answer_prefix_ids), self.start_ids) >= 0:
            # It follows a forced close; opening thinking again there would be closed again, without end.
            raise LmforgeError("the answer prefix must not contain the start thinking delimiter")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, *, max_tokens: int | None = None, min_tokens: int = 0,
                       delimiters: Sequence[str] = DEFAULT_DELIMITERS, extension: str = DEFAULT_EXTENSION,
                       answer_prefix: str | None = None) -> "ThinkingBudget":
        """The budget with its delimiters looked up in ``tokenizer``'s vocabulary (each must be one token: a
        string the vocabulary lacks would be spelled out in pieces the model never emits as a delimiter)."""
        if len(delimiters) != 2 or not all(isinstance(d, str) and d for d in delimiters):
            raise LmforgeError(f"thinking_delimiters must be two non-empty strings (start, end), got "
                               f"{list(delimiters)!r}")
        lookup = _lookup(tokenizer)
        ids = []
        for which, text in zip(("start", "end"), delimiters):
            token = lookup(text)
            if token is None:
                raise LmforgeError(f"the tokenizer has no token {text!r} (the {which} thinking delimiter); budget "
                                   f"forcing needs the model's thinking delimiters as tokens of its vocabulary; "
                                   f"name them with thinking_delimiters")
            ids.append((int(token),))
        if not isinstance(extension, str) or (min_tokens and not extension):
            raise LmforgeError(f"thinking_extension must be a non-empty string, got {extension!r}")
        if answer_prefix is not None and not isinstance(answer_prefix, str):
            raise LmforgeError(f"answer_prefix must be a string, got {answer_prefix!r}")
        return cls(ids[0], ids[1], min_tokens, max_tokens, tuple(_encode(tokenizer, extension)),
                   tuple(_encode(tokenizer, answer_prefix)) if answer_prefix else ())

    @property
    def token_ids(self) -> set[int]:
        """Every id this budget may append (for a vocabulary check)."""
        return {*self.start_ids, *self.end_ids, *self.extension_ids, *self.answer_prefix_ids}

    def opens_in(self, prompt_ids: Sequence[int]) -> bool:
        """Whether thinking is open at the end of the prompt: its last start delimiter comes after its last end
        delimiter (a chat template that writes ``<think>`` into the generation prompt)."""
        start = _last_index(prompt_ids, self.start_ids)
        return start >= 0 and start > _last_index(prompt_ids, self.end_ids)

    def start(self, prompt_ids: Sequence[int]) -> "ThinkingState":
        """The state of one output continuing ``prompt_ids``."""
        return ThinkingState(self, prompt_ids)


class ThinkingState:
    """Where one output stands: inside thinking or not, thinking tokens so far, and the last few tokens (to
    recognise a delimiter written over several tokens, the prompt's tail included)."""

    def __init__(self, budget: ThinkingBudget, prompt_ids: Sequence[int] = ()) -> None:
        self.budget = budget
        self.inside = budget.opens_in(prompt_ids)
        self.count = 0  # thinking tokens generated so far (all spans of this output)
        self.closing = False  # the cap's end delimiter is being written
        self._window = max(len(budget.start_ids), len(budget.end_ids))
        self.tail: list[int] = list(prompt_ids[max(len(prompt_ids) - self._window, 0):])

    def __repr__(self) -> str:
        return f"ThinkingState(inside={self.inside}, count={self.count}, closing={self.closing})"

    @property
    def at_cap(self) -> bool:
        cap = self.budget.max_tokens
        return self.inside and not self.closing and cap is not None and self.count >= cap

    def advance(self, sampled: int) -> list[int]:
        """The tokens to append after the model chose ``sampled``, in order; the state moves past all of them.

        Usually ``[sampled]``. Below the minimum, an end delimiter (its first token) becomes the extension. When
        thinking reaches the cap (already before this token, or within what is appended), whatever was left
        is dropped for the rest of the end delimiter and the answer prefix; those come without sampling.
        """
        b = self.budget
        if self.at_cap:  # e.g. a cap of 0 with thinking open in the prompt: nothing of the model's is kept
            queue = self._close()
        elif self.inside and not self.closing and self.count < b.min_tokens and sampled == b.end_ids[0]:
            queue = list(b.extension_ids)  # s1: the model wants to stop thinking too early; make it go on
        else:
            queue = [sampled]
        out: list[int] = []
        while queue:
            token = queue.pop(0)
            out.append(token)
            self._observe(token)
            if self.at_cap:
                queue = self._close()  # whatever was left (an extension's tail) is dropped
        return out

    def _close(self) -> list[int]:
        """Rest of the end delimiter (its part already written by the model is kept) plus the answer prefix."""
        end = self.budget.end_ids
        have = next((k for k in range(len(end) - 1, 0, -1) if _ends_with(self.tail, end[:k])), 0)
        self.closing = True
        return [*end[have:], *self.budget.answer_prefix_ids]

    def _observe(self, token: int) -> None:
        b = self.budget
        self.tail.append(token)
        del self.tail[:-self._window]
        if self.inside:
            if _ends_with(self.tail, b.end_ids):
                if not self.closing:  # the model closed by itself: its delimiter's leading tokens were counted
                    self.count -= len(b.end_ids) - 1
                self.inside = self.closing = False
            elif not self.closing:
                self.count += 1
        elif _ends_with(self.tail, b.start_ids):
            self.inside = True


def add_thinking_flags(parser: argparse.ArgumentParser) -> None:
    """``--max-thinking-tokens`` and friends, for ``lmforge generate`` and ``lmforge chat``."""
    group = parser.add_argument_group("budget forcing (s1): bounds on the model's thinking, in tokens")
    group.add_argument("--max-thinking-tokens", type=int, default=None, metavar="N",
                       help="after N thinking tokens the end delimiter is forced (then --answer-prefix)")
    group.add_argument("--min-thinking-tokens", type=int, default=0, metavar="N",
                       help="below N thinking tokens an end delimiter is replaced by --thinking-extension")
    group.add_argument("--thinking-extension", default=DEFAULT_EXTENSION, metavar="TEXT",
                       help=f"inserted in place of an early end delimiter (default {DEFAULT_EXTENSION!r})")
    group.add_argument("--answer-prefix", default=None, metavar="TEXT",
                       help="appended after the end delimiter forced at the cap, e.g. 'Final Answer:'")
    group.add_argument("--thinking-delimiters", nargs=2, default=list(DEFAULT_DELIMITERS), metavar=("START", "END"),
                       help="the tokens that open and close thinking (default <think> </think>)")


def budget_from_args(args: argparse.Namespace, tokenizer: Any, new_tokens: int,
                     new_tokens_flag: str = "--max-new-tokens") -> ThinkingBudget | None:
    """The budget the flags ask for (None when they ask for none), checked against the output's length."""
    if args.max_thinking_tokens is None and not args.min_thinking_tokens:
        return None
    check_budget_numbers(args.min_thinking_tokens, args.max_thinking_tokens, new_tokens, new_tokens_flag)
    return ThinkingBudget.from_tokenizer(tokenizer, max_tokens=args.max_thinking_tokens,
                                         min_tokens=args.min_thinking_tokens, delimiters=args.thinking_delimiters,
                                         extension=args.thinking_extension, answer_prefix=args.answer_prefix)


__all__ = ["DEFAULT_DELIMITERS", "DEFAULT_EXTENSION", "ThinkingBudget", "ThinkingState", "add_thinking_flags",
           "budget_from_args", "check_budget_numbers"]
