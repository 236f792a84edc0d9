"""``lmforge rejection-sample`` and ``lmforge iterative-dpo``: outputs, counts, and their error paths."""

from __future__ import annotations

import json

import pytest

from lmforge.align.reward_model import RewardModel, save_reward_model
from lmforge.cli import main
from lmforge.data.sft import read_chat_jsonl
from lmforge.data.tokenizer import train_bpe_tokenizer
from lmforge.models.checkpoint import save_model
from lmforge.models.config import Config
from lmforge.models.model import Transformer


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny chat model (and a reward model on the same tokenizer) plus a prompt file with answers."""
    root = tmp_path_factory.mktemp("rs")
    tok = train_bpe_tokenizer(["yes no maybe 1 2 3 " * 20, "Answer yes or no."] * 10, vocab_size=300)
    cfg = Config.from_hf(dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64, eos_token_id=tok.eos_ids))
    save_model(Transformer(cfg).init_weights(std=0.05, seed=0), root / "model", tokenizer=tok)
    save_reward_model(RewardModel(Transformer(cfg).init_weights(std=0.05, seed=1)), root / "rm", tokenizer=tok)
    # An SFT-style record (its answer is dropped) and plain prompts; 'answer' is the verifier's reference.
    records = [{"messages": [{"role": "user", "content": "Answer yes or no."},
                             {"role": "assistant", "content": "yes"}], "answer": "yes"},
               {"messages": [{"role": "user", "content": "Say no."}], "answer": "no"},
               {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Maybe?"}]},
               {"messages": [{"role": "user", "content": "Count."}], "answer": "3"}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def sample_args(ws, *extra):
    return ["--model", str(ws / "model"), "--prompts", str(ws / "prompts.jsonl"), "--n", "4",
            "--max-new-tokens", "4", "--temperature", "1.5", "--device", "cpu", *extra]


def test_rejection_sample_writes_sft_data(ws, tmp_path, capsys):
    out = tmp_path / "sft.jsonl"
    # A format check that holds for any non-empty answer: every prompt keeps its (first) best sample.
    assert main(["rejection-sample", *sample_args(ws, "--reward", "regex:.", "--out", str(out))]) == 0
    printed = capsys.readouterr().out
    assert "kept 4 of 4 prompts (0 below the threshold, 0 unscorable" in printed and "mean best score 1.000" in printed
    convs = read_chat_jsonl(out)  # what `lmforge sft` reads
    assert [c[-1]["role"] for c in convs] == ["assistant"] * 4 and convs[0][0]["content"] == "Answer yes or no."
    assert all(c[-1]["content"].strip() for c in convs)
    # The same prompts scored by a reward model, with a threshold no random model reaches.
    assert main(["rejection-sample", *sample_args(ws, "--reward-model", str(ws / "rm"), "--out",
                                                  str(tmp_path / "rm.jsonl"))]) == 0
    assert len(read_chat_jsonl(tmp_path / "rm.jsonl")) == 4
    assert main(["rejection-sample", *sample_args(ws, "--reward-model", str(ws / "rm"), "--threshold", "1e9",
                                                  "--out", str(tmp_path / "none.jsonl"))]) == 2
    assert "kept none of 4 prompts (4 below the threshold" in capsys.readouterr().err
    assert not (tmp_path / "none.jsonl").exists()


def test_rejection_sample_counts_unscorable_prompts(ws, tmp_path, capsys):
    # exact_number needs a numeric reference: the prompts answered 'yes'/'no' or without one are unscorable
    # (logged skips, never a crash); without a threshold the last prompt keeps its best try, right or wrong.
    out = tmp_path / "sft.jsonl"
    assert main(["rejection-sample", *sample_args(ws, "--reward", "exact_number", "--out", str(out))]) == 0
    assert "kept 1 of 4 prompts (0 below the threshold, 3 unscorable; 12 of 16 samples" in capsys.readouterr().out
    assert read_chat_jsonl(out)[0][0]["content"] == "Count."


@pytest.mark.parametrize("command", ["rejection-sample", "iterative-dpo"])
def test_error_paths(ws, tmp_path, capsys, command):
    out = ["--out", str(tmp_path / "out.jsonl")]
    both = sample_args(ws, "--reward", "exact_number", "--reward-model", str(ws / "rm"), *out)
    assert main([command, *both]) == 2
    assert "exactly one of --reward (a verifier) and --reward-model" in capsys.readouterr().err
    assert main([command, *sample_args(ws, *out)]) == 2
    assert "exactly one of --reward" in capsys.readouterr().err
    missing = ["--model", str(ws / "model"), "--prompts", str(tmp_path / "nope.jsonl"), "--reward", "exact_number"]
    assert main([command, *missing, *out]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                   + json.dumps({"text": "x"}) + "\n")
    assert main([command, "--model", str(ws / "model"), "--prompts", str(bad), "--reward", "exact_number", *out]) == 2
    assert "bad.jsonl:2: needs a 'messages' list" in capsys.readouterr().err
    assert main([command, *sample_args(ws, "--reward", "nonsense", *out)]) == 2
    assert "--reward 'nonsense'" in capsys.readouterr().err
    assert main([command, *sample_args(ws, "--reward-model", str(ws / "model"), *out)]) == 2
    assert "not a reward model" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_iterative_dpo_command_runs_a_round(ws, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["iterative-dpo", *sample_args(ws, "--reward-model", str(ws / "rm"), "--out", str(run), "--rounds", "1",
                                          "--steps-per-round", "2", "--loss", "cdpo", "--beta", "0.5", "--nll-weight", "1",
                                          "--lr", "1e-3", "--batch-size", "2", "--eval-prompts",
                                          str(ws / "prompts.jsonl"))]
    assert main(args + ["data.val_fraction=0.5"]) == 0
    out = capsys.readouterr().out
    assert "round 0: eval reward" in out and "pairs from 4 prompts" in out
    assert f"final policy: {run / 'round_1' / 'model'}" in out
    recipe = json.loads((run / "round_1" / "train" / "recipe.json").read_text())
    assert recipe["preference"] == {"beta": 0.5, "loss_type": "sigmoid", "label_smoothing": 0.1, "simpo_gamma": 0.5,
                                    "nll_weight": 1.0}
    assert recipe["optim"]["lr"] == 1e-3 and recipe["batch_size"] == 2
    stats = json.loads((run / "round_1" / "stats.json").read_text())
    assert stats["eval_reward"] is not None and stats["pairs"]["pairs"] == 4
    assert stats["heldout_accuracy"] is not None and "held-out accuracy" in out  # 2 of the 4 pairs held out
    assert stats["pairs"]["mean_chosen"] > stats["pairs"]["mean_rejected"]
    # --label-smoothing belongs to cDPO only; recipe overrides are checked like everywhere else.
    assert main(args[:-1] + [args[-1], "--loss", "ipo", "--label-smoothing", "0.2"]) == 2
    assert "--label-smoothing applies to --loss cdpo only" in capsys.readouterr().err
    # A bad override fails before any sampling, not after the first round's generation.
    fresh = [a if a != str(run) else str(tmp_path / "fresh") for a in args]
    assert main(fresh + ["optim.lrr=1"]) == 2
    assert "unknown recipe field 'optim.lrr'" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()
