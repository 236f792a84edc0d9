"""Iterative DPO: best-vs-worst on-policy pairs, counted skips, rounds on disk, and learning a rewarded behaviour."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from lmforge.align.dpo import PreferenceDataset
from lmforge.align.iterative import iterative_dpo, make_preference_pairs, pairs_from_results, policy_reward
from lmforge.align.preference_data import read_preference_jsonl
from lmforge.align.rejection import PromptResult, RejectionConfig, sample_completions
from lmforge.align.reward_model import RewardModel
from lmforge.data.chat import read_prompt_jsonl
from lmforge.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models.checkpoint import load_model, save_model
from lmforge.models.config import Config
from lmforge.models.model import Transformer

PROMPT = [{"role": "user", "content": "Answer yes or no."}]
SAMPLING = RejectionConfig(max_new_tokens=4, temperature=1.5, seed=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random chat model saved with its tokenizer: (directory, model, tokenizer)."""
    tok = train_bpe_tokenizer(["yes no maybe " * 20, "Answer yes or no."] * 10, vocab_size=300)
    cfg = Config.from_hf(dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64, eos_token_id=tok.eos_ids))
    path = save_model(Transformer(cfg).init_weights(std=0.05, seed=0), tmp_path_factory.mktemp("it") / "base",
                      tokenizer=tok)
    return path, load_model(path), load_tokenizer(path)


def ask(text: str, answer: str = "yes") -> dict:
    return {"messages": [{"role": "user", "content": text}], "answer": answer}


def length_reward(completion: str, reference: str) -> float:
    """Graded (few ties), and broken on purpose for two references."""
    if reference == "boom":
        raise RuntimeError("verifier crashed")
    return math.nan if reference == "nan" else float(len(completion))


def result(completions, scores):
    return PromptResult(PROMPT, completions, scores, best=None, kept=False)


def test_pairs_are_best_vs_worst_and_skip_ties_unscorable_and_empty():
    stats = pairs_from_results([
        result(["a", "b", "c"], [0.5, 1.0, 0.0]),
        result(["a", "b", "c"], [1.0, 1.0, 1.0]),  # all tie
        result(["a", "b", "c"], [None, None, None]),  # reward failed everywhere
        result(["a", "b"], [None, 2.0]),  # one score: nothing to compare
        result(["", "  ", "x", "y"], [9.0, 8.0, 0.3, 0.1]),  # empty answers never take part, whatever their score
        result(["s", "t", "u"], [1.0, 1.0, 0.0]),  # tied best: the first wins
        result(["same", "same "], [1.0, 0.0]),  # one text twice: no preference to learn
    ])
    assert (stats.prompts, stats.pairs, stats.tied, stats.unscorable) == (7, 3, 2, 2)
    assert stats.skipped_samples == 3 + 1 + 2
    got = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in stats.records]
    assert got == [("b", "c"), ("x", "y"), ("s", "u")]
    assert stats.records[0]["prompt"] == PROMPT and stats.records[0]["chosen"][0]["role"] == "assistant"
    assert stats.mean_chosen == pytest.approx((1.0 + 0.3 + 1.0) / 3)
    assert stats.mean_rejected == pytest.approx((0.0 + 0.1 + 0.0) / 3)


def test_on_policy_pairs_count_failing_rewards_and_feed_dpo(base, tmp_path):
    path, model, tok = base
    records = [ask("Answer yes or no."), ask("Say no.", "boom"), ask("Maybe?", "nan"), ask("Yes?")]
    out = tmp_path / "pairs.jsonl"
    stats = make_preference_pairs(model, tok, records, 6, reward_fn=length_reward, cfg=SAMPLING, out_path=out)
    assert stats.prompts == 4 and stats.unscorable == 2 and stats.pairs + stats.tied == 2
    assert stats.skipped_samples >= 12  # every sample of the two broken prompts
    assert stats.pairs >= 1
    # The same seeded samples again: each pair is the first longest answer against the first shortest.
    samples = sample_completions(model, tok, [r["messages"] for r in records], dataclasses.replace(SAMPLING, n=6))
    pairs = read_preference_jsonl(out)  # the file is valid preference JSONL, in chat format
    assert len(pairs) == stats.pairs
    for pair in pairs:
        completions = next(s for r, s in zip(records, samples) if r["messages"] == pair.prompt)
        usable = [c for c in completions if c.strip()]
        assert pair.chosen[0]["content"] == max(usable, key=len)
        assert pair.rejected[0]["content"] == min(usable, key=len)
    assert len(PreferenceDataset([str(out)], tok, max_len=64)) == stats.pairs  # and encodes for DPO


def test_reward_model_labels_and_nan_scores_are_skipped(base):
    _, model, tok = base
    rm = RewardModel(Transformer(model.config).init_weights(std=0.05, seed=1))
    records = [ask("Answer yes or no."), ask("Say no.")]
    stats = make_preference_pairs(model, tok, records, 4, reward_model=rm, cfg=SAMPLING)
    assert stats.pairs == 2 and all(p["chosen_score"] > p["rejected_score"] for p in stats.records)
    with torch.no_grad():
        rm.head.weight.fill_(math.nan)
    stats = make_preference_pairs(model, tok, records, 4, reward_model=rm, cfg=SAMPLING)
    assert (stats.pairs, stats.unscorable, stats.skipped_samples) == (0, 2, 8)


def test_bad_prompt_records_are_named(base, tmp_path):
    _, model, tok = base
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps(ask("a")) + "\n" + json.dumps({"prompt": "no messages"}) + "\n")
    with pytest.raises(LmforgeError, match=r"prompts.jsonl:2: needs a 'messages' list"):
        read_prompt_jsonl(bad)
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(LmforgeError, match=r"prompts.jsonl:1: message 0 has role 'robot'"):
        read_prompt_jsonl(bad)
    # An SFT record's answer is dropped, so SFT data doubles as prompts; the reference answer is kept.
    bad.write_text(json.dumps({"messages": PROMPT + [{"role": "assistant", "content": "yes"}], "answer": 1}) + "\n")
    assert read_prompt_jsonl(bad) == [{"messages": PROMPT, "answer": "1"}]
    with pytest.raises(LmforgeError, match="prompt record 1"):
        make_preference_pairs(model, tok, [ask("a"), {"messages": []}], 2, reward_fn=length_reward, cfg=SAMPLING)
    with pytest.raises(LmforgeError, match="exactly one of"):
        make_preference_pairs(model, tok, [ask("a")], 2, cfg=SAMPLING)


def test_rounds_on_disk_and_round_two_starts_from_and_refers_to_round_one(base, tmp_path):
    path, _, _ = base
    records = [ask("Answer yes or no."), ask("Say no."), ask("Yes?"), ask("Maybe?")]
    kw = dict(reward_fn=length_reward, n=4, sampling=SAMPLING, steps_per_round=2,
              overrides=["optim.lr=1e-3", "device=cpu"], device="cpu", log=lambda s: None)
    (first,) = iterative_dpo(path, records, 1, tmp_path / "run", **kw)
    r1 = tmp_path / "run" / "round_1"
    assert first.round == 1 and first.model == str(r1 / "model") and first.pairs["pairs"] >= 1
    assert len(read_preference_jsonl(r1 / "pairs.jsonl")) == first.pairs["pairs"]
    assert json.loads((r1 / "stats.json").read_text())["pairs"]["pairs"] == first.pairs["pairs"]
    before, after = load_model(path).state_dict(), load_model(r1 / "model").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # round 1 trained the policy

    logs = []
    history = iterative_dpo(path, records, 2, tmp_path / "run", **{**kw, "log": logs.append})
    assert [h.round for h in history] == [1, 2] and history[0] == first
    assert any("round 1: already done" in line for line in logs)  # finished rounds are reused
    r2 = tmp_path / "run" / "round_2"
    assert (r2 / "model" / "config.json").is_file() and (r2 / "pairs.jsonl").is_file()
    # Round 2 starts from round 1's policy, and its reference log-probs are cached from that model before
    # training: policy == reference at the first step, so the first DPO loss is exactly log 2.
    assert json.loads((r2 / "train" / "recipe.json").read_text())["model"]["path"] == str(r1 / "model")
    assert history[1].first_loss == pytest.approx(math.log(2), abs=1e-5)


def test_a_round_without_pairs_is_a_clear_error(base, tmp_path):
    path, _, _ = base
    with pytest.raises(LmforgeError, match="round 1 made no preference pairs"):
        iterative_dpo(path, [ask("a")], 1, tmp_path / "run", reward_fn=lambda c, r: 1.0, n=4, sampling=SAMPLING,
                      device="cpu", log=lambda s: None)
    with pytest.raises(LmforgeError, match="exactly one of"):
        iterative_dpo(path, [ask("a")], 1, tmp_path / "run", n=4, device="cpu")


def test_iterative_dpo_raises_the_rate_of_a_rewarded_first_token(base, tmp_path):
    path, model, tok = base
    # Sample from the 4 likeliest tokens; reward one of them as the first token (the least likely one
    # whose text no other candidate starts with), so the behaviour is neither absent nor already usual.
    ids = torch.tensor([tok.apply_chat_template(PROMPT, add_generation_prompt=True)])
    with torch.no_grad():
        top = model(ids)[0, -1].topk(4).indices.tolist()
    texts = [tok.decode([t]) for t in top]
    target = next(t for t in reversed(texts) if t.strip() and t.isprintable()
                  and not any(o != t and o.startswith(t) for o in texts))

    def first_token(completion: str, reference: str) -> float:
        return 1.0 if completion.startswith(target) else 0.0

    # Seed 1: on the engine's sampler, seeds 1-5 all end at 0.66-0.97; seed 0's third round collapses (0.0).
    sampling = RejectionConfig(max_new_tokens=3, temperature=1.0, top_k=4, seed=1)
    records = [{"messages": PROMPT}] * 8
    start = policy_reward(model, tok, records, dataclasses.replace(sampling, n=8, seed=7), reward_fn=first_token)
    history = iterative_dpo(path, records, 3, tmp_path / "run", reward_fn=first_token, n=8, sampling=sampling,
                            steps_per_round=10, overrides=["optim.lr=1e-2", "preference.beta=0.5", "device=cpu"],
                            device="cpu", log=lambda s: None)
    assert all(h.pairs["mean_chosen"] == 1.0 and h.pairs["mean_rejected"] == 0.0 for h in history)
    final = load_model(history[-1].model)
    end = policy_reward(final, tok, records, dataclasses.replace(sampling, n=8, seed=7), reward_fn=first_token)
    assert 0.05 < start < 0.5 and end > start + 0.3, (target, start, end)
