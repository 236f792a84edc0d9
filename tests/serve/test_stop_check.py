"""The engine's stop-string check: per token it searches only the new piece (plus the longest stop's length
- 1 before it) in one compiled scan; its cost does not grow with the stop list or the text."""

from __future__ import annotations

import pytest

from .tiny_server import save_tiny_chat_model


def test_stop_strings_find_only_matches_touching_the_new_text():
    from lmforge.engine.engine import StopStrings

    stops = StopStrings(["a.b", "(x", "lo w"])
    assert stops.longest == 4
    assert stops.find("axb then a.b", 0) == 9  # regex characters are literal
    assert stops.find("hello world", 6) == 3  # "lo w" straddles the old text and the new piece ("w...")
    assert stops.find("hello world", 7) == -1  # it ends before the new piece: found (or not) a step earlier
    assert stops.find("f(x", 2) == 1


class CountingStr(str):
    """A stop string that counts how often its length is asked for (a scan over the list asks each)."""

    calls = 0

    def __len__(self) -> int:
        CountingStr.calls += 1
        return super().__len__()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from lmforge.engine.engine import Engine

    return Engine(save_tiny_chat_model(tmp_path_factory.mktemp("stop") / "tiny", layers=1, heads=2, kv_heads=1),
                  max_num_batched_tokens=64)


def test_per_token_stop_cost_does_not_scale_with_the_stop_list(engine):
    from lmforge.engine.sequence import SamplingParams

    k, tokens, n = 2000, 24, 4
    stops = [CountingStr(f"never-{i}-") for i in range(k)]
    CountingStr.calls = 0
    out = engine.generate(["the quick"], SamplingParams(max_tokens=tokens, n=n, temperature=1.0, seed=0,
                                                        stop=stops, ignore_eos=True))[0]
    assert all(len(o.token_ids) == tokens for o in out.outputs)
    # building the matcher looks at each stop string a few times; a per-token scan would be k * tokens * n
    assert CountingStr.calls <= 5 * k, CountingStr.calls


def test_stop_string_spanning_tokens_still_cuts_the_text(engine):
    from lmforge.engine.sequence import SamplingParams

    base = engine.generate(["the quick"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = base.outputs[0].text
    if len(text) < 8:
        pytest.skip("the random model produced too little text")
    stop = text[3:7]
    cut = engine.generate(["the quick"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                        stop=["unrelated", stop]))[0].outputs[0]
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"
