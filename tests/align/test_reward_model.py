"""Reward model: readout at the last real token, Bradley-Terry training on the engine, save/load."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lmforge.align.preference_data import PreferencePair, collate_pairs, encode_pair
from lmforge.align.reward_model import (RewardModel, RewardObjective, load_reward_model, pairwise_accuracy,
                                        save_reward_model)
from lmforge.data.tokenizer import train_bpe_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models.checkpoint import save_model
from lmforge.models.config import Config
from lmforge.models.model import Transformer
from lmforge.train.recipe import DataSpec, ModelSpec, OptimSpec, TrainConfig
from lmforge.train.trainer import Data, Trainer

HF = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "light", "paper", "sugar"]


@pytest.fixture(scope="module")
def tok():
    texts = [f"Say {a}. {a} please {b}. {a} {b} {c}." for a in WORDS for b in WORDS[:3] for c in WORDS[-3:]]
    return train_bpe_tokenizer(texts, vocab_size=300)


def tiny_rm(seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(Transformer(Config.from_hf(HF)).init_weights(std=0.05, seed=seed))


def pairs(tok, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Chosen answers contain the marker word "please" in the middle; rejected ones a random word there,
    so the head must read content from earlier positions, not just the final token."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.sample(WORDS, 3)
        pair = PreferencePair(f"Say {a}.", f" {a} please {b}.", f" {a} {c} {b}.")
        out.append(encode_pair(tok, pair, max_len=32))
    return out


def test_reward_is_read_at_the_last_real_token(tok):
    rm = tiny_rm().eval()
    items = pairs(tok, 4, seed=5)
    batch = collate_pairs(items, tok.pad_id)  # right-padded rows of different lengths
    padded = rm.score(batch["input_ids"], batch["attention_mask"])
    assert padded.shape == (8,) and padded.dtype == torch.float32
    for row in range(8):
        n = int(batch["attention_mask"][row].sum())
        alone = rm.score(batch["input_ids"][row:row + 1, :n])
        assert torch.allclose(padded[row], alone[0], atol=1e-5)


def test_trained_reward_model_prefers_the_marker_and_round_trips(tok, tmp_path):
    train, held_out = pairs(tok, 128, seed=0), pairs(tok, 64, seed=1)
    rm = tiny_rm()
    cfg = TrainConfig(task="dpo", out_dir=str(tmp_path / "run"), model=ModelSpec(config=HF),
                      data=DataSpec(train=["<in memory>"], seq_len=32), batch_size=16, max_steps=60, device="cpu",
                      precision="fp32", eval_every=0, save_every=0, progress=False, plot=False,
                      optim=OptimSpec(lr=3e-3, warmup_steps=0, weight_decay=0.0))
    trainer = Trainer(cfg, rm, Data(train=train, val=held_out, pad_id=tok.pad_id), tokenizer=tok,
                      objective=RewardObjective())
    before = pairwise_accuracy(rm, held_out, tok.pad_id)
    losses = [trainer.train_step()["loss"] for _ in range(cfg.max_steps)]
    after = pairwise_accuracy(rm, held_out, tok.pad_id)
    assert before["accuracy"] < 0.9 <= after["accuracy"]
    assert after["margin"] > 0 and losses[-1] < 0.3 < math.log(2)
    assert trainer.evaluate() < 0.3  # held-out Bradley-Terry loss per pair

    path = save_reward_model(rm, tmp_path / "rm", tokenizer=tok)
    loaded = load_reward_model(path)
    batch = collate_pairs(held_out[:8], tok.pad_id)
    assert torch.equal(rm.score(batch["input_ids"], batch["attention_mask"]),
                       loaded.score(batch["input_ids"], batch["attention_mask"]))
    assert pairwise_accuracy(loaded, held_out, tok.pad_id) == after
    assert not list(tmp_path.glob(".rm.*"))  # no temp directories left behind


def test_loading_a_plain_checkpoint_names_the_missing_head(tmp_path):
    save_model(tiny_rm().backbone, tmp_path / "lm")
    with pytest.raises(LmforgeError, match="no reward_head.safetensors"):
        load_reward_model(tmp_path / "lm")
    with pytest.raises(LmforgeError, match="does not exist"):
        load_reward_model(tmp_path / "nowhere")


def test_wrong_head_shape_is_rejected(tmp_path):
    from safetensors.torch import save_file

    save_reward_model(tiny_rm(), tmp_path / "rm")
    save_file({"weight": torch.zeros(1, 7)}, tmp_path / "rm" / "reward_head.safetensors")
    with pytest.raises(LmforgeError, match=r"shape \[1, 32\]"):
        load_reward_model(tmp_path / "rm")


def test_objective_loss_is_log_two_when_rewards_tie(tok, tmp_path):
    rm = tiny_rm()
    with torch.no_grad():
        rm.head.weight.zero_()  # every reward 0 -> -log sigmoid(0) per pair
    cfg = TrainConfig(task="dpo", out_dir=str(tmp_path / "run"), model=ModelSpec(config=HF),
                      data=DataSpec(train=["<in memory>"], seq_len=32), batch_size=4, max_steps=1, device="cpu",
                      progress=False, plot=False)
    trainer = Trainer(cfg, rm, Data(train=pairs(tok, 8, 2), val=None, pad_id=tok.pad_id), objective=RewardObjective())
    assert abs(trainer.train_step()["loss"] - math.log(2)) < 1e-6


def test_head_initialisation_depends_on_the_seed_only():
    a = tiny_rm()
    torch.rand(1000)  # whatever else consumed the global RNG in between
    b = tiny_rm()
    assert torch.equal(RewardModel(a.backbone, seed=3).head.weight, RewardModel(b.backbone, seed=3).head.weight)
    assert not torch.equal(RewardModel(a.backbone, seed=3).head.weight, RewardModel(a.backbone, seed=4).head.weight)
