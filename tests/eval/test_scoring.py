"""Scoring definitions on hand-computed values: pairs, windows, acc/acc_norm, perplexity, bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmforge.eval import scoring


class CharTokenizer:
    """One token per character (ids = code points), BOS = 1: makes token arithmetic visible."""

    bos_token, bos_id, eos_id = "\x01", 1, 2

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def test_encode_pair_moves_trailing_space_and_handles_empty_context():
    tok = CharTokenizer()
    ctx, cont = scoring.encode_pair(tok, "ab ", "c")
    assert ctx == [1, ord("a"), ord("b")] and cont == [ord(" "), ord("c")]
    assert scoring.encode_pair(tok, "", "xy") == ([1], [1, ord("x"), ord("y")])
    # a context already starting with the BOS string gets no second BOS
    assert scoring.tok_encode(tok, "\x01a") == [1, ord("a")]


@pytest.mark.parametrize("n,max_len", [(1, 4), (4, 4), (5, 4), (9, 4), (13, 5), (3, 1)])
def test_rolling_windows_score_every_token_once_with_full_inputs(n, max_len):
    tokens = list(range(100, 100 + n))
    windows = scoring.rolling_windows(tokens, prefix=0, max_length=max_len)
    assert [t for _, cont in windows for t in cont] == tokens
    for i, (ctx, cont) in enumerate(windows):
        seq = ctx + cont
        assert len(seq) - 1 <= max_len  # the model input (seq[:-1]) fits
        if i > 0:  # later windows re-read the tokens before them, up to a full window
            assert seq == tokens[tokens.index(cont[-1]) + 1 - len(seq):tokens.index(cont[-1]) + 1]
            assert len(seq) - 1 == max_len
    assert windows[0][0] == [0]
    assert scoring.rolling_windows([], 0, 4) == []


def test_choice_metrics_normalise_by_characters():
    # "10" wins both ways: -3 > -4 raw, -3/2 > -4/1 per character
    m = scoring.choice_metrics([-3.0, -4.0], ["10", "7"], gold=1)
    assert m == {"acc": 0.0, "acc_norm": 0.0}
    m = scoring.choice_metrics([-3.0, -1.8], ["1000", "7"], gold=0)
    assert m == {"acc": 0.0, "acc_norm": 1.0}  # -3/4 = -0.75 beats -1.8/1


def test_perplexity_metrics_hand_values():
    lls, words, nbytes = [-10.0, -20.0], [5, 5], [10, 20]
    m = scoring.perplexity_metrics(lls, words, nbytes)
    assert m["word_perplexity"] == pytest.approx(math.exp(3.0))
    assert m["byte_perplexity"] == pytest.approx(math.exp(1.0))
    assert m["bits_per_byte"] == pytest.approx(1 / math.log(2))
    assert scoring.doc_weights("héllo  world\n") == (3, 14)


def test_bootstrap_stderr_seeded_and_close_to_analytic():
    values = np.array([1.0] * 30 + [0.0] * 70)
    a = scoring.bootstrap_stderr(values, iters=2000, seed=3)
    assert a == scoring.bootstrap_stderr(values, iters=2000, seed=3)
    assert a != scoring.bootstrap_stderr(values, iters=2000, seed=4)
    assert a == pytest.approx(math.sqrt(0.3 * 0.7 / 100), rel=0.1)
    # a custom aggregate over rows (ratio of sums) is seeded the same way
    rows = np.array([[-1.0, 2.0], [-3.0, 2.0], [-2.0, 1.0]])
    f = lambda r: -r[:, 0].sum() / r[:, 1].sum()  # noqa: E731
    assert scoring.bootstrap_stderr(rows, f, iters=200, seed=1) == scoring.bootstrap_stderr(rows, f, iters=200, seed=1)
    assert math.isnan(scoring.bootstrap_stderr([1.0]))


def test_exact_match():
    assert scoring.exact_match(" 42", "42") == 1.0 and scoring.exact_match(None, "42") == 0.0
    assert scoring.exact_match("4", "42") == 0.0
