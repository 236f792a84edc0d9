"""Test-time strategies over the engine: exact selection rules (ties included), the prompt computed once for
N samples (the engine's counter), beam search against a toy reward, reward-model scoring, the CLI."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lmforge.cli import main
from lmforge.engine import Engine, SamplingParams
from lmforge.engine.complete import complete
from lmforge.engine.strategies import (
    RewardScorer,
    Scorer,
    answer_extractor,
    best_index,
    best_of_n,
    majority_vote,
    parse_verifier,
    self_consistency,
    step_beam_search,
    weighted_majority,
    weighted_vote,
)
from lmforge.errors import LmforgeError
from lmforge.models.reward import RewardModel, load_reward_model, save_reward_model

from .conftest import CharTokenizer

PROMPT = [26 + (i * 7) % 26 for i in range(33)]  # 33 tokens: two full blocks of 16, then one more


# ---- selection rules ---------------------------------------------------------------------------------
def test_majority_vote_ties_go_to_the_answer_sampled_first():
    assert majority_vote(["7", "5", "5", "7"]) == ("7", 2)
    assert majority_vote(["5", "7", "7", "5"]) == ("5", 2)
    assert majority_vote(["3", "4", "4"]) == ("4", 2)  # a strict majority beats an earlier answer
    assert majority_vote([None, "9", None, "8", "8", "9"]) == ("9", 2)  # unparseable samples do not vote
    assert majority_vote([None, None]) == (None, 0)
    assert majority_vote([]) == (None, 0)


def test_best_index_is_the_first_argmax_and_skips_unscored():
    assert best_index([1.0, 3.0, 3.0, 2.0]) == 1
    assert best_index([None, math.nan, 0.5, -1.0]) == 2
    assert best_index([-math.inf, -math.inf]) == 0
    assert best_index([None, math.nan]) is None


def test_weighted_vote_with_hand_weights():
    # a: 3.0, b: 1.0 + 1.5 = 2.5, c: 2.5 -> a, although b has the most votes
    assert weighted_vote(["a", "b", "b", "c"], [3.0, 1.0, 1.5, 2.5]) == ("a", 3.0)
    assert weighted_vote(["b", "a", None], [1.0, 1.0, 5.0]) == ("b", 1.0)  # tie: sampled first; None no vote
    assert weighted_vote([None], [1.0]) == (None, 0.0)
    with pytest.raises(LmforgeError, match="2 answers but 1 weights"):
        weighted_vote(["a", "b"], [1.0])
    with pytest.raises(LmforgeError, match="finite"):
        weighted_vote(["a"], [math.nan])


def test_answer_extraction():
    by_regex = answer_extractor(r"= (\d+)")
    assert by_regex("2 + 2 = 4, so 4 + 3 = 7.") == "7"  # the last match, group 1
    assert by_regex("no number here") is None
    assert answer_extractor(r"\d+")("x 12 y 34") == "34"  # no group: the whole match
    assert answer_extractor(None)("  42\n") == "42" and answer_extractor(None)("  ") is None
    assert answer_extractor(lambda t: t.split()[-1] if t.split() else None)("the answer is  9 ") == "9"
    with pytest.raises(LmforgeError, match="does not compile"):
        answer_extractor("(unclosed")


def test_parse_verifier():
    extract = answer_extractor(r"answer: (\d+)")
    exact = parse_verifier("answer:12", extract)
    assert exact("q", "answer: 12") == 1.0 and exact("q", "answer: 123") == 0.0
    matches = parse_verifier("regex-match:fox$", extract)
    assert matches("q", "the fox") == 1.0 and matches("q", "the fox jumps") == 0.0
    with pytest.raises(LmforgeError, match="unknown verifier"):
        parse_verifier("exact=3", extract)


# ---- sampling strategies over the engine ------------------------------------------------------------------
def test_n_samples_compute_the_prompt_once(tiny_model):
    model, tok = tiny_model("llama"), CharTokenizer()
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=0)
    one = self_consistency(model, PROMPT, 1, params, tok)
    assert one.usage.prompt_tokens == one.usage.prompt_tokens_computed == 33
    r = self_consistency(model, PROMPT, 8, params, tok, extract=r"([aeiou])")
    # Sample 1 computes the 33 prompt tokens; samples 2..8 fork from it (full blocks shared, the last partly
    # filled block copied) and sample their first token from its logits: the prompt is computed once.
    assert r.usage.prompt_tokens == 8 * 33
    assert r.usage.prompt_tokens_computed == 33
    assert r.usage.generated_tokens == sum(len(c.token_ids) for c in r.candidates) == 8 * 6
    # Forking does not need the prefix cache; repeated prompts in separate requests do.
    no_cache = Engine(model, tok, block_size=16, num_blocks=64, enable_prefix_caching=False)
    again = self_consistency(no_cache, PROMPT, 8, params, tok, extract=r"([aeiou])")
    assert again.usage.prompt_tokens_computed == 33
    assert [c.token_ids for c in again.candidates] == [c.token_ids for c in r.candidates]
    assert [c.token_ids for c in again.candidates] == [c.token_ids for c in r.candidates]  # same seeded samples


def test_self_consistency_picks_the_majority_answer(tiny_model):
    model, tok = tiny_model("llama"), CharTokenizer()
    r = self_consistency(model, PROMPT, 12, SamplingParams(temperature=1.0, max_tokens=6, seed=3), tok,
                         extract=r"([aeiou])")
    answers = [c.answer for c in r.candidates]
    assert answers == [answer_extractor(r"([aeiou])")(c.text) for c in r.candidates]
    counts = {a: answers.count(a) for a in answers if a is not None}
    assert r.votes == max(counts.values()) >= 2  # seed 3 repeats an answer, so the vote decides something
    tied = [a for a in counts if counts[a] == r.votes]
    assert r.answer == min(tied, key=answers.index)  # among tied answers, the one sampled first
    assert r.best is r.candidates[answers.index(r.answer)]


def toy_reward(prompt: str, completion: str) -> float:
    """Rewards the letters e and a (CharTokenizer text): many distinct scores, some ties."""
    return completion.count("e") + 0.1 * completion.count("a")


def test_best_of_n_picks_the_first_argmax(tiny_model):
    model, tok = tiny_model("llama"), CharTokenizer()
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=1)
    r = best_of_n(model, PROMPT, 16, params, toy_reward, tok)
    scores = [toy_reward("", c.text) for c in r.candidates]
    assert [c.score for c in r.candidates] == scores
    assert r.best is r.candidates[scores.index(max(scores))]
    assert len({c.text for c in r.candidates}) > 1
    # The samples are the same seeded ones every strategy draws; a constant score keeps the first.
    flat = best_of_n(model, PROMPT, 16, params, lambda p, c: 1.0, tok)
    assert [c.token_ids for c in flat.candidates] == [c.token_ids for c in r.candidates]
    assert flat.best is flat.candidates[0]


class HandScorer(Scorer):
    """Scores given by hand, in sampling order."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def score(self, prompt: str, completions) -> list[float]:
        return self.values[:len(completions)]


def test_weighted_majority_weights_answers_by_exp_score(tiny_model):
    model, tok = tiny_model("llama"), CharTokenizer()
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=3)
    plain = self_consistency(model, PROMPT, 12, params, tok, extract=r"([aeiou])")
    answers = [c.answer for c in plain.candidates]
    # Give every sample of a minority answer a high score: the weighted vote must flip to it.
    minority = next(a for a in answers if a is not None and a != plain.answer)
    values = [4.0 if a == minority else 0.0 for a in answers]
    r = weighted_majority(model, PROMPT, 12, params, HandScorer(values), tok, extract=r"([aeiou])")
    assert [c.answer for c in r.candidates] == answers
    weights = [math.exp(v - 4.0) for v in values]
    assert (r.answer, r.votes) == weighted_vote(answers, weights)
    assert r.answer == minority and r.votes == pytest.approx(answers.count(minority))
    assert r.best is r.candidates[answers.index(minority)]
    with pytest.raises(LmforgeError, match="needs scores >= 0"):
        weighted_majority(model, PROMPT, 4, params, HandScorer([1.0, -1.0, 0.0, 0.0]), tok, weighting="raw")


def test_a_strategy_that_needs_a_scorer_says_so(tiny_model):
    model, tok = tiny_model("llama"), CharTokenizer()
    params = SamplingParams(temperature=1.0, max_tokens=4, seed=0)
    with pytest.raises(LmforgeError, match="strategy 'best-of-n' needs a scorer"):
        best_of_n(model, PROMPT, 4, params, None, tok)
    with pytest.raises(LmforgeError, match="strategy 'weighted-majority' needs a scorer"):
        weighted_majority(model, PROMPT, 4, params, None, tok)
    with pytest.raises(LmforgeError, match="strategy 'beam' needs a scorer"):
        step_beam_search(model, PROMPT, None, tokenizer=tok)


# ---- step-level beam search -------------------------------------------------------------------------------
BEAM = {"step_delimiter": "a", "max_steps": 4, "max_step_tokens": 5}
STOP_IDS = [30, 40]  # end a solution ("stop"), so finished beams have to be kept across steps


def step_reward(prompt: str, completion: str) -> float:
    """Share of e's (a's count half): a mean, so a short finished beam can outrank longer open ones."""
    return (completion.count("e") + 0.5 * completion.count("a")) / max(len(completion), 1)


def _rank(pool):
    return sorted(pool, key=lambda c: -c.score)  # stable: ties keep pool order


def test_beam_search_keeps_the_top_scored_beams_each_step(tiny_model):
    model, tok = tiny_model("llama"), CharTokenizer()
    width = 3
    params = SamplingParams(temperature=1.0, seed=1, stop_token_ids=STOP_IDS)
    r = step_beam_search(model, PROMPT, step_reward, beam_width=width, expansions_per_beam=3, params=params,
                         tokenizer=tok, **BEAM)
    assert 2 <= len(r.steps) <= 4
    prev = [None]  # the empty partial solution
    finished_seen = False
    for step in r.steps:
        for cand, parent in zip(step.candidates, step.parents):
            assert cand.score == step_reward("", tok.decode(cand.token_ids)) and cand.text == tok.decode(cand.token_ids)
            base = [] if prev[parent] is None else prev[parent].token_ids
            assert cand.token_ids[:len(base)] == base and len(cand.token_ids) > len(base)
            assert prev[parent] is None or prev[parent].finish_reason != "stop"  # finished beams are not extended
        carried = [b for b in prev if b is not None and b.finish_reason == "stop"]
        assert step.kept == _rank(carried + step.candidates)[:width]
        finished_seen |= any(b in step.kept for b in carried)
        prev = step.kept
    assert finished_seen  # with this seed a finished beam outranks new candidates: keeping it was exercised
    assert r.candidates == r.steps[-1].kept
    assert r.best is max(r.candidates, key=lambda c: c.score)  # first among equals
    # Every sampled token counts, also those of merged duplicates and dropped candidates.
    parents = [[None]] + [s.kept for s in r.steps]
    kept_new = sum(len(c.token_ids) - (0 if before[i] is None else len(before[i].token_ids))
                   for before, s in zip(parents, r.steps) for c, i in zip(s.candidates, s.parents))
    assert kept_new <= r.usage.generated_tokens <= len(r.steps) * width * 3 * BEAM["max_step_tokens"]


def test_beam_width_one_is_greedy_by_score(tiny_model):
    """Width 1, rebuilt by hand with complete(): each step, sample the same seeded expansions of the prefix
    and continue from the best-scored one."""
    model, tok = tiny_model("llama"), CharTokenizer()
    expansions, seed = 4, 7
    params = SamplingParams(temperature=1.0, seed=seed, stop_token_ids=STOP_IDS)
    r = step_beam_search(model, PROMPT, step_reward, beam_width=1, expansions_per_beam=expansions, params=params,
                         tokenizer=tok, **BEAM)
    prefix: list[int] = []
    for k in range(BEAM["max_steps"]):
        step = SamplingParams(temperature=1.0, n=expansions, seed=seed + k * expansions, stop=[BEAM["step_delimiter"]],
                              max_tokens=BEAM["max_step_tokens"], stop_token_ids=STOP_IDS)
        samples = complete(model, [PROMPT + prefix], step, tok)[0]
        options = [prefix + s.token_ids for s in samples]
        scores = [step_reward("", tok.decode(ids)) for ids in options]
        prefix = options[scores.index(max(scores))]
        assert r.steps[k].kept[0].token_ids == prefix
        if prefix[-1] in STOP_IDS:
            break
    assert r.best.token_ids == prefix and len(r.steps) == k + 1


# ---- reward-model scoring ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_and_rm(tmp_path_factory):
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.checkpoint import load_model
    from lmforge.models.model import Transformer

    from ..serve.tiny_server import save_tiny_chat_model

    root = tmp_path_factory.mktemp("strategies")
    model_dir = save_tiny_chat_model(root / "policy")
    tok = load_tokenizer(model_dir)
    policy = load_model(model_dir)
    rm = RewardModel(Transformer(policy.config).init_weights(std=0.2, seed=1), seed=1)
    rm_dir = save_reward_model(rm, root / "rm", tokenizer=tok)
    return model_dir, rm_dir, policy, tok, rm


def test_reward_scorer_reads_prompt_plus_completion_in_batches(chat_and_rm):
    import lmforge.align.reward_model as align_rm

    _, rm_dir, policy, tok, rm = chat_and_rm
    assert align_rm.RewardModel is RewardModel and align_rm.load_reward_model is load_reward_model
    loaded = load_reward_model(rm_dir)  # the round trip through the model layer
    prompt = tok.encode("the quick brown")
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=0)
    r = best_of_n(policy, prompt, 6, params, RewardScorer(loaded, tok, batch_size=4), tok)
    eos = set(tok.eos_ids)
    for c in r.candidates:  # one row at a time, no padding: what the batched, padded scores must equal
        ids = c.token_ids[:-1] if c.token_ids and c.token_ids[-1] in eos else c.token_ids
        alone = rm.score(torch.tensor([prompt + ids])).item()
        assert c.score == pytest.approx(alone, abs=1e-5)
    assert r.best is r.candidates[best_index([c.score for c in r.candidates])]
    assert len({round(c.score, 6) for c in r.candidates}) > 1
    text = RewardScorer(loaded, tok).score("the quick brown", [" fox jumps", " lazy dog"])
    by_ids = RewardScorer(loaded, tok).score_ids(tok.encode("the quick brown"),
                                                 [tok.encode(" fox jumps", add_special_tokens=False),
                                                  tok.encode(" lazy dog", add_special_tokens=False)])
    assert text == by_ids


def test_weighted_majority_and_beam_with_a_reward_model(chat_and_rm):
    _, rm_dir, policy, tok, _ = chat_and_rm
    scorer = RewardScorer(load_reward_model(rm_dir), tok)
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=2)
    w = weighted_majority(policy, "the quick", 6, params, scorer, tok, extract=r"(\w+)")
    assert w.answer is not None and w.votes > 0
    long_prompt = "the quick brown fox jumps over the lazy dog. " * 3  # more than one KV block of 16 tokens
    assert len(tok.encode(long_prompt)) > 16
    b = step_beam_search(policy, long_prompt, scorer, beam_width=2, expansions_per_beam=2, step_delimiter=" ",
                         max_steps=3, max_step_tokens=4, params=SamplingParams(temperature=1.0, seed=0), tokenizer=tok)
    assert b.best.score == max(c.score for c in b.candidates)
    assert b.usage.prompt_tokens_computed < b.usage.prompt_tokens  # later steps reuse earlier steps' KV


# ---- command line ------------------------------------------------------------------------------------------
def test_cli_strategies(chat_and_rm, capsys):
    from lmforge.data.tokenizer import load_tokenizer

    model_dir, rm_dir, *_ = chat_and_rm
    base = ["generate", "--model", str(model_dir), "--prompt", "the quick", "--max-new-tokens", "5", "--seed", "0"]
    prompt_len = len(load_tokenizer(model_dir).encode("the quick"))
    assert main(base + ["--strategy", "majority", "--n", "4", "--answer-regex", r"(\w+)"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the quick")
    m = re.search(r"\[majority of 4: (?:answer '.*', \d+ votes|no answer extracted); prompt tokens computed "
                  r"(\d+) of (\d+) \(the rest from the prefix cache\); (\d+) tokens generated\]", err)
    assert m, err
    assert int(m.group(2)) == 4 * prompt_len and int(m.group(1)) <= 4 * prompt_len and int(m.group(3)) <= 20
    assert main(base + ["--strategy", "best-of-n", "--n", "3", "--reward-model", str(rm_dir)]) == 0
    assert re.search(r"\[best-of-n of 3: .*score -?\d", capsys.readouterr().err)
    assert main(base + ["--strategy", "best-of-n", "--n", "3", "--verifier", "regex-match:o"]) == 0
    assert main(base + ["--strategy", "beam", "--n", "2", "--beam-width", "2", "--max-steps", "2",
                        "--step-delimiter", " ", "--reward-model", str(rm_dir)]) == 0
    assert "[beam of width 2 x 2 expansions, " in capsys.readouterr().err


def test_cli_strategy_without_reward_model_is_one_clear_error(tmp_path, capsys):
    # Checked before anything loads: the model path does not even exist.
    argv = ["generate", "--model", str(tmp_path / "none"), "--prompt", "hi", "--strategy", "beam"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge generate: error: --strategy beam needs a reward model: pass --reward-model PATH")
    assert main(argv[:-1] + ["weighted-majority"]) == 2
    assert "--strategy weighted-majority needs a reward model" in capsys.readouterr().err
    assert main(argv[:-1] + ["majority", "--reward-model", str(tmp_path)]) == 2
    assert "--strategy majority does not score samples" in capsys.readouterr().err
