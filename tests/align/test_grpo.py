"""GRPO with a verifiable reward: rollouts, skipped rewards, and learning to prefer rewarded answers."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.align.grpo import GRPOConfig, GRPOTrainer, _sequences
from lmforge.errors import ConfigError
from lmforge.models.config import Config
from lmforge.models.model import Transformer
from lmforge.data.sft import IGNORE_INDEX


def tiny_model(seed=0):
    cfg = Config.from_hf(dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64))
    return Transformer(cfg).init_weights(std=0.05, seed=seed)


PROMPTS = [{"messages": [{"role": "user", "content": "Answer yes or no."}], "answer": "yes"}] * 4


def says_yes(completion: str, reference: str) -> float:
    return 1.0 if "yes" in completion else 0.0


def starts_lowercase(completion: str, reference: str) -> float:
    return float(completion[:1].islower())


def test_sequences_put_labels_on_completions_only():
    batch = _sequences([[5, 6, 7], [5]], [[8, 9], [4, 3, 2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 4, 3, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 8, 9], [4, 3, 2, IGNORE_INDEX]]


def test_grpo_raises_the_reward(tok, tmp_path):
    torch.manual_seed(0)
    cfg = GRPOConfig(steps=60, prompts_per_step=4, group_size=8, max_new_tokens=3, lr=1e-2, beta=0.01, seed=0)
    trainer = GRPOTrainer(tiny_model(), tok, PROMPTS, says_yes, cfg, tmp_path / "grpo")
    history = trainer.fit()
    first = sum(h["reward"] for h in history[:5]) / 5
    last = sum(h["reward"] for h in history[-5:]) / 5
    assert last > first + 0.3, (first, last)
    assert all(math.isfinite(h["loss"]) for h in history)
    assert (tmp_path / "grpo" / "metrics.jsonl").is_file()


def test_failing_reward_is_skipped_not_trained_on(tok, tmp_path):
    calls = {"n": 0}

    def flaky(completion, reference):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("grader crashed")
        return float("nan") if calls["n"] % 5 == 0 else 1.0

    cfg = GRPOConfig(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=2, seed=0)
    trainer = GRPOTrainer(tiny_model(), tok, PROMPTS, flaky, cfg, tmp_path / "g")
    batch, adv, stats = trainer.rollout(0)
    assert trainer.skipped > 0 and torch.isfinite(adv).all()
    history = trainer.fit()
    assert all(math.isfinite(h["loss"]) for h in history) and history[-1]["skipped_rewards"] == trainer.skipped


def test_bad_config(tok, tmp_path):
    with pytest.raises(ConfigError, match="group_size"):
        GRPOTrainer(tiny_model(), tok, PROMPTS, says_yes, GRPOConfig(group_size=1), tmp_path)
    with pytest.raises(ConfigError, match="mini_batch_size.*divide"):
        GRPOConfig(prompts_per_step=4, group_size=4, mini_batch_size=6).validate()


def test_minibatches_make_several_optimizer_steps_per_rollout(tok, tmp_path):
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=2, seed=0, save_every=0,
                     updates_per_batch=2, mini_batch_size=2, progress=False)
    trainer = GRPOTrainer(tiny_model(), tok, PROMPTS, says_yes, cfg, tmp_path / "g")
    trainer.fit()
    # 8 completions in minibatches of 2, two passes: 8 Adam steps on the one rollout batch.
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 8


def test_cli(tok, tmp_path, capsys):
    import json

    from lmforge import save_model
    from lmforge.cli import main

    save_model(tiny_model(), tmp_path / "m", tokenizer=tok)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Answer {i}"}], "answer": str(i)})
                               + "\n" for i in range(6)))
    args = ["grpo", "--model", str(tmp_path / "m"), "--prompts", str(prompts), "--out", str(tmp_path / "run"),
            "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "2"]
    assert main(args) == 0
    assert "mean reward" in capsys.readouterr().out and (tmp_path / "run" / "model" / "config.json").is_file()
    assert main(args + ["--reward", "nonsense"]) == 2
    assert "--reward 'nonsense'" in capsys.readouterr().err
    assert main(args + ["--updates-per-batch", "2", "--mini-batch-size", "2", "--out", str(tmp_path / "mb")]) == 0
    assert main(args + ["--mini-batch-size", "3"]) == 2
    assert "'mini_batch_size' (3) must be positive and divide" in capsys.readouterr().err


def test_cli_resume(tok, tmp_path, capsys):
    import json

    from lmforge import save_model
    from lmforge.cli import main
    from lmforge.train.trainer import read_metrics

    save_model(tiny_model(), tmp_path / "m", tokenizer=tok)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Answer {i}"}], "answer": str(i)})
                               + "\n" for i in range(6)))
    args = ["grpo", "--model", str(tmp_path / "m"), "--prompts", str(prompts), "--out", str(tmp_path / "run"),
            "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "2"]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "3", "--resume"]) == 0
    assert "(step 3) -> " in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_cli_config_layers(tmp_path):
    """grpo reads GRPOConfig like every training command: defaults < recipe < key=value < flags given."""
    from lmforge.align.cli import GRPO_DEFAULTS
    from lmforge.cli import build_parser
    from lmforge.train.cli import load_config

    recipe = tmp_path / "grpo.yaml"
    recipe.write_text("steps: 7\ngroup_size: 4\nlr: 1.0e-4\n")

    def config(*extra):
        args = build_parser().parse_args(["grpo", "--model", "m", "--prompts", "p", *extra])
        return load_config(args, GRPOConfig, GRPO_DEFAULTS)

    cfg = config(str(recipe), "group_size=6")
    assert (cfg.steps, cfg.group_size, cfg.lr, cfg.prompts_per_step, cfg.device) == (7, 6, 1e-4, 16, "auto")
    cfg = config(str(recipe), "group_size=6", "--group-size", "2", "--device", "cpu")
    assert (cfg.steps, cfg.group_size, cfg.device) == (7, 2, "cpu")
    with pytest.raises(ConfigError, match="clip_eps"):
        config("clip_eps=-1")


class _OldFormulaGRPO(GRPOTrainer):
    """GRPO as it was computed before the rollout speed-ups: a masked forward with logits on every position, and
    the sampling policy's log-probs from a separate no-grad forward even with one optimizer step per rollout."""

    single_update = False

    def forward_rows(self, batch, module=None, **kwargs):
        return self.harness.forward(batch, module, **kwargs)

    def completion_logprobs(self, batch, module):
        from lmforge.align.losses import token_logprobs

        return token_logprobs(self.harness.forward(batch, module), batch["labels"])

    def group_logprobs(self, batch, module, prompts, completions):
        return self.completion_logprobs(batch, module)  # every row's whole prompt + completion, G times

    def forward_kwargs(self, minibatch):
        return {}

    def objective(self, logits, minibatch):
        from lmforge.align.losses import grpo_loss, token_logprobs

        logps = token_logprobs(logits, minibatch["labels"])
        mask = minibatch["labels"] != IGNORE_INDEX
        loss, clip_frac, kl = grpo_loss(logps, minibatch["old_logps"], minibatch.get("ref_logps"),
                                        minibatch["advantages"], mask, self.cfg.clip_eps, self.cfg.beta)
        return loss, {"loss": loss.detach(), "kl": kl, "clip_fraction": clip_frac}


@pytest.mark.parametrize("updates_per_batch,mini_batch_size", [(1, None), (2, 4)])
def test_fast_path_matches_the_old_formula(tok, tmp_path, updates_per_batch, mini_batch_size):
    """LM head on completions only, no padding mask, and (one update per rollout) the old log-probs taken from
    the update's own forward: the same samples, losses and weights as the plain formula, step after step.
    (Computing each group's prompt once is tested on its own below: its log-probs differ from the full rows' by
    rounding, ~5e-7, and a step whose advantages are all zero then has a KL gradient of ~1e-8 instead of exactly 0,
    which Adam turns into a full-size step: the weights would part here for that reason alone.)"""
    cfg = dict(steps=3, prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e-2, beta=0.05, seed=0,
               save_every=0, progress=False, updates_per_batch=updates_per_batch, mini_batch_size=mini_batch_size)
    prompts = [{"messages": [{"role": "user", "content": "Answer yes or no." + " maybe" * i}], "answer": "yes"}
               for i in range(4)]  # prompts of different lengths: rows with padding
    new = GRPOTrainer(tiny_model(), tok, prompts, starts_lowercase, GRPOConfig(**cfg), tmp_path / "new")
    new.group_logprobs = lambda batch, module, prompts, completions: new.completion_logprobs(batch, module)
    old = _OldFormulaGRPO(tiny_model(), tok, prompts, starts_lowercase, GRPOConfig(**cfg), tmp_path / "old")
    assert new.single_update == (updates_per_batch == 1) and not old.single_update
    b_new, b_old = new.rollout(0), old.rollout(0)
    assert torch.equal(b_new.batch["input_ids"], b_old.batch["input_ids"])
    assert (b_new.batch["attention_mask"] == 0).any()  # some padding is exercised
    assert ("old_logps" in b_new.batch) == (updates_per_batch > 1)
    mask = b_new.batch["labels"] != IGNORE_INDEX
    torch.testing.assert_close(b_new.batch["ref_logps"][mask], b_old.batch["ref_logps"][mask], rtol=0, atol=1e-5)
    if updates_per_batch > 1:
        torch.testing.assert_close(b_new.batch["old_logps"][mask], b_old.batch["old_logps"][mask], rtol=0, atol=1e-5)
    for _ in range(cfg["steps"]):
        r_new, r_old = new.train_step(), old.train_step()
        assert r_new["loss"] == pytest.approx(r_old["loss"], abs=1e-5)
        assert r_new["kl"] == pytest.approx(r_old["kl"], abs=1e-5)
        assert r_new["grad_norm"] == pytest.approx(r_old["grad_norm"], rel=1e-4)
    for (name, p), q in zip(new.model.named_parameters(), old.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(new.model.parameters(), tiny_model().parameters()))


def test_group_logprobs_compute_each_prompt_once_and_match_the_full_rows(tok, tmp_path):
    cfg = GRPOConfig(steps=1, prompts_per_step=3, group_size=4, max_new_tokens=6, beta=0.05, seed=0, save_every=0,
                     progress=False)
    prompts = [{"messages": [{"role": "user", "content": "Answer yes or no." + " maybe" * i}], "answer": "yes"}
               for i in range(3)]
    trainer = GRPOTrainer(tiny_model(), tok, prompts, starts_lowercase, cfg, tmp_path)
    _, rows, _ = trainer.prompts_of(0, repeat=cfg.group_size)
    completions, _, _ = trainer.sample(rows, 0)
    completions[1] = []  # an empty completion (a sample that ended at once) has no labels
    batch = trainer.to_device(_sequences(rows, completions, trainer.pad_id))
    seen = []
    trainer.reference.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("input_ids", a[0] if a else None)),
                                                with_kwargs=True)
    grouped = trainer.group_logprobs(batch, trainer.reference, rows, completions)
    assert seen[0].shape[0] == len(prompts)  # the prompts ran once each, not group_size times
    full = trainer.completion_logprobs(batch, trainer.reference)
    mask = batch["labels"] != IGNORE_INDEX
    torch.testing.assert_close(grouped[mask], full[mask], rtol=0, atol=1e-5)
    assert (grouped[~mask] == 0).all()
