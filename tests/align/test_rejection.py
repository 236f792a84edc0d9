"""Best-of-N rejection sampling: selection, ties, thresholds, unscorable prompts, and the SFT JSONL."""

from __future__ import annotations

import pytest
import torch

from lmforge.align.rejection import (RejectionConfig, best_of_n, rejection_sample, reward_model_scores,
                                     sample_completions)
from lmforge.align.reward_model import RewardModel
from lmforge.data.sft import read_chat_jsonl
from lmforge.data.tokenizer import train_bpe_tokenizer
from lmforge.errors import ConfigError, LmforgeError
from lmforge.models.config import Config
from lmforge.models.model import Transformer


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(["yes no maybe " * 20, "Answer yes or no."] * 10, vocab_size=300)


@pytest.fixture(scope="module")
def model():
    cfg = Config.from_hf(dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64))
    return Transformer(cfg).init_weights(std=0.05, seed=0)


def ask(text: str, answer: str = "yes") -> dict:
    return {"messages": [{"role": "user", "content": text}], "answer": answer}


def counts_reference(completion: str, reference: str) -> float:
    """Prefers completions made of the reference's letters, the more the better (graded, so it discriminates among
    a random model's samples whatever they are)."""
    return float(sum(completion.count(ch) for ch in set(reference)))


CFG = RejectionConfig(n=8, max_new_tokens=6, temperature=1.5, seed=0)


def test_kept_completion_beats_every_alternative_and_jsonl_reads_back(model, tok, tmp_path):
    records = [ask("Answer yes or no.", "yes"), ask("Say no.", "no"), ask("Maybe?", "maybe")]
    out = tmp_path / "sft.jsonl"
    stats = rejection_sample(model, tok, records, out, CFG, reward_fn=counts_reference)
    assert stats.prompts == 3 and stats.kept == 3 and stats.below_threshold == stats.unscorable == 0
    for rec, r in zip(records, stats.results):
        assert len(r.completions) == 8 and r.best is not None
        rewards = [counts_reference(c, rec["answer"]) for c in r.completions]
        candidates = [x for x, c in zip(rewards, r.completions) if c.strip()]
        assert r.best_score == rewards[r.best] == max(candidates)
        assert r.best == rewards.index(max(candidates))  # ties go to the first sample
    assert any(r.best_score > 0 for r in stats.results)  # the reward really discriminated somewhere
    convs = read_chat_jsonl(out)
    assert len(convs) == 3
    for conv, rec, r in zip(convs, records, stats.results):
        assert conv[:-1] == rec["messages"]
        assert conv[-1] == {"role": "assistant", "content": r.completions[r.best]}


def test_threshold_and_failing_rewards_are_counted(model, tok, tmp_path):
    def picky(completion: str, reference: str) -> float:
        if reference == "boom":
            raise RuntimeError("reward crashed")
        return 1.0 if reference == "easy" else -1.0

    records = [ask("a", "easy"), ask("b", "hard"), ask("c", "boom"), ask("d", "easy")]
    cfg = RejectionConfig(n=4, max_new_tokens=4, temperature=1.5, threshold=0.0, prompts_per_batch=3)
    stats = rejection_sample(model, tok, records, tmp_path / "out.jsonl", cfg, reward_fn=picky)
    assert (stats.kept, stats.below_threshold, stats.unscorable) == (2, 1, 1)
    assert [r.kept for r in stats.results] == [True, False, False, True]
    assert stats.skipped_samples >= 4 and stats.mean_best_score == 1.0
    assert len(read_chat_jsonl(tmp_path / "out.jsonl")) == 2
    # Constant rewards tie everywhere: the first non-empty sample wins.
    first = best_of_n(model, tok, records[:1], cfg, reward_fn=lambda c, r: 0.5).results[0]
    assert first.best == next(i for i, c in enumerate(first.completions) if c.strip())


def test_nothing_kept_is_an_error_and_nothing_is_written(model, tok, tmp_path):
    cfg = RejectionConfig(n=2, max_new_tokens=3, threshold=10.0)
    with pytest.raises(LmforgeError, match="kept none of 1 prompts"):
        rejection_sample(model, tok, [ask("a")], tmp_path / "none.jsonl", cfg, reward_fn=counts_reference)
    assert not (tmp_path / "none.jsonl").exists()


def test_reward_model_scoring_picks_its_argmax(model, tok, tmp_path):
    torch.manual_seed(1)
    rm = RewardModel(Transformer(model.config).init_weights(std=0.05, seed=1))
    records = [ask("Answer yes or no."), ask("Say no.")]
    stats = rejection_sample(model, tok, records, tmp_path / "rm.jsonl", CFG, reward_model=rm)
    for rec, r in zip(records, stats.results):
        direct = reward_model_scores(rm, tok, rec["messages"], r.completions)
        candidates = [s for s, c in zip(direct, r.completions) if c.strip()]
        assert r.best_score == pytest.approx(max(candidates), abs=1e-5)
    assert len(read_chat_jsonl(tmp_path / "rm.jsonl")) == 2


def test_sampling_is_seeded_and_bad_inputs_are_named(model, tok):
    prompts = [ask("Answer yes or no.")["messages"]]
    assert sample_completions(model, tok, prompts, CFG) == sample_completions(model, tok, prompts, CFG)
    with pytest.raises(ConfigError, match="temperature"):
        best_of_n(model, tok, [ask("a")], RejectionConfig(temperature=0.0), reward_fn=counts_reference)
    with pytest.raises(LmforgeError, match="exactly one of reward_fn and reward_model"):
        best_of_n(model, tok, [ask("a")], CFG)
    with pytest.raises(LmforgeError, match="record 0"):
        best_of_n(model, tok, [{"prompt": "a"}], CFG, reward_fn=counts_reference)
    done = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(LmforgeError, match="assistant turn"):
        best_of_n(model, tok, [done], CFG, reward_fn=counts_reference)
