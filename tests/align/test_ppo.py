"""PPO: one step trains policy and value head, EMA reference, advantage whitening, reward failures, the CLI,
and learning a trivially rewarded behaviour."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.align.losses import masked_mean
from lmforge.align.ppo import PPOConfig, PPOTrainer
from lmforge.align.reward_model import RewardModel, save_reward_model
from lmforge.errors import ConfigError, LmforgeError
from lmforge.data.sft import IGNORE_INDEX

from .test_grpo import PROMPTS, says_yes, starts_lowercase, tiny_model


def make(tok, tmp_path, reward=starts_lowercase, **overrides) -> PPOTrainer:
    kw = dict(steps=2, rollout_batch_size=8, mini_batch_size=4, max_new_tokens=3, lr=3e-3, save_every=0,
              progress=False)
    kw.update(overrides)
    return PPOTrainer(tiny_model(), tok, PROMPTS, reward, PPOConfig(**kw), tmp_path / "ppo")


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_one_step_changes_policy_and_value_head(tok, tmp_path):
    # A constant reward still trains: V = 0 at first, so returns and GAE advantages are non-zero.
    trainer = make(tok, tmp_path, reward=lambda c, a: 1.0, steps=1, kl_coef=0.1)
    before = params(trainer.module)
    (record,) = trainer.fit()
    after = params(trainer.module)
    assert not torch.equal(before["value_head.weight"], after["value_head.weight"])
    assert not torch.equal(before["policy.lm_head.weight"], after["policy.lm_head.weight"])
    for key in ("reward", "kl", "value_loss", "policy_loss", "clip_fraction", "explained_variance",
                "rollout_tok_s", "update_tok_s", "truncated", "approx_kl", "grad_norm", "lr"):
        assert key in record and math.isfinite(record[key]), key
    assert json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert (tmp_path / "ppo" / "loss.png").is_file()


def test_value_head_fits_a_fixed_batch(tok, tmp_path):
    trainer = make(tok, tmp_path, reward=lambda c, a: len(c) / 4, ppo_epochs=1, value_clip_eps=10.0, vf_coef=1.0)
    rollout = trainer.rollout(0)
    losses = [trainer.update(rollout, 0)["value_loss"] for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_ema_reference_moves_toward_the_policy(tok, tmp_path):
    trainer = make(tok, tmp_path, reward=lambda c, a: 1.0, steps=1, ref_ema=0.9, kl_coef=0.1)
    ref_before = trainer.reference.lm_head.weight.detach().clone()
    assert torch.equal(ref_before, trainer.model.lm_head.weight)  # the reference starts as the policy
    trainer.fit()
    policy = trainer.model.lm_head.weight.detach()
    assert not torch.equal(policy, ref_before)
    expected = 0.9 * ref_before + 0.1 * policy
    assert torch.allclose(trainer.reference.lm_head.weight, expected, atol=1e-7, rtol=0)


def test_frozen_reference_stays(tok, tmp_path):
    trainer = make(tok, tmp_path, steps=1, ref_ema=0.0, kl_coef=0.1)
    ref_before = params(trainer.reference)
    trainer.fit()
    assert all(torch.equal(v, trainer.reference.state_dict()[k]) for k, v in ref_before.items())


def test_advantages_are_whitened_over_completion_tokens(tok, tmp_path):
    trainer = make(tok, tmp_path, rollout_batch_size=16, kl_coef=0.1)
    trainer.fit()  # two steps, so values and the KL term are no longer zero
    batch, adv, _ = trainer.rollout(2)
    mask = batch["labels"] != IGNORE_INDEX
    assert abs(float(masked_mean(adv, mask))) < 1e-5
    assert abs(float(adv[mask].std()) - 1.0) < 1e-4
    assert torch.all(adv[~mask] == 0)


def test_returns_carry_the_sequence_score(tok, tmp_path):
    """gamma = lam = 1, step 0 (reference = policy, so no KL reward): every completion token's return is the score."""
    trainer = make(tok, tmp_path, lam=1.0, kl_coef=0.1, normalize_advantages=False)
    batch, _, stats = trainer.rollout(0)
    mask = batch["labels"] != IGNORE_INDEX
    texts = [tok.decode(row[m].tolist()) for row, m in zip(batch["labels"], mask)]
    for row, text in enumerate(texts):
        want = starts_lowercase(text, "")
        assert torch.allclose(batch["returns"][row][mask[row]], torch.tensor(want), atol=1e-6)


def test_failing_rewards_are_skipped_and_counted(tok, tmp_path):
    calls = {"n": 0}

    def flaky(completion, reference):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("grader crashed")
        return float("nan") if calls["n"] % 4 == 0 else 1.0

    trainer = make(tok, tmp_path, reward=flaky, steps=3)
    history = trainer.fit()
    assert trainer.skipped > 0 and history[-1]["skipped_rewards"] == trainer.skipped
    assert all(math.isfinite(h[k]) for h in history for k in ("loss", "value_loss", "policy_loss", "reward"))
    batch, adv, _ = trainer.rollout(3)
    assert torch.isfinite(adv).all()


def test_no_usable_reward_skips_the_update(tok, tmp_path):
    def broken(completion, reference):
        raise ValueError("no grader")

    trainer = make(tok, tmp_path, reward=broken, steps=1)
    before = params(trainer.module)
    (record,) = trainer.fit()
    assert record["update_skipped"] == 1 and record["skipped_rewards"] == 8 and math.isnan(record["reward"])
    assert all(torch.equal(v, trainer.module.state_dict()[k]) for k, v in before.items())


def test_equal_rewards_give_finite_losses(tok, tmp_path):
    for kl_coef in (0.0, 0.1):
        trainer = make(tok, tmp_path, reward=lambda c, a: 1.0, kl_coef=kl_coef, steps=2)
        history = trainer.fit()
        assert all(math.isfinite(v) for h in history for v in h.values() if isinstance(v, float))
        assert torch.isfinite(trainer.rollout(2).advantages).all()


def test_truncated_reward_replaces_the_score(tok, tmp_path):
    trainer = make(tok, tmp_path, reward=lambda c, a: 1.0, max_new_tokens=1, truncated_reward=-1.0)
    _, _, stats = trainer.rollout(0)
    eos_share = 1 - stats["truncated"]
    assert stats["reward"] == pytest.approx(eos_share * 1.0 + (1 - eos_share) * -1.0)
    assert stats["truncated"] > 0.5  # one random token is rarely an EOS


def test_reward_model_as_reward(tok, tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(tiny_model(seed=1))
    prompts = [{"messages": p["messages"]} for p in PROMPTS]  # no answers needed
    trainer = PPOTrainer(tiny_model(), tok, prompts, rm, PPOConfig(steps=1, rollout_batch_size=4, mini_batch_size=2,
                                                                   max_new_tokens=2, save_every=0, progress=False),
                         tmp_path / "rm")
    (record,) = trainer.fit()
    assert math.isfinite(record["reward"]) and record["reward"] != 0
    assert not any(p.requires_grad for p in rm.parameters())


@pytest.mark.parametrize("field, value, message", [
    ("mini_batch_size", 3, "multiple of 'mini_batch_size'"),
    ("ref_ema", 1.0, "'ref_ema' must be in \\[0, 1\\)"),
    ("lam", 1.5, "'lam' must be in \\[0, 1\\]"),
    ("temperature", 0.0, "'temperature' must be > 0"),
    ("ppo_epochs", 0, "'ppo_epochs' must be positive"),
    ("truncated_reward", float("nan"), "'truncated_reward' must be a finite number"),
])
def test_bad_config(tok, tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        make(tok, tmp_path, **{field: value})


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(LmforgeError, match="needs 'messages' and 'answer'"):
        PPOTrainer(tiny_model(), tok, [{"messages": []}], says_yes, PPOConfig(), tmp_path)
    with pytest.raises(LmforgeError, match="reward must be a function"):
        PPOTrainer(tiny_model(), tok, PROMPTS, "exact_number", PPOConfig(), tmp_path)


def test_ppo_raises_a_trivially_learnable_reward(tok, tmp_path):
    """Reward 1 when the completion starts with a lowercase letter (about 1 in 5 tokens at random init)."""
    trainer = make(tok, tmp_path, steps=30, rollout_batch_size=32, mini_batch_size=8, max_new_tokens=2)
    history = trainer.fit()
    first = sum(h["reward"] for h in history[:5]) / 5
    last = sum(h["reward"] for h in history[-5:]) / 5
    assert last > first + 0.4, [h["reward"] for h in history]
    assert all(math.isfinite(h["loss"]) for h in history)


# ---- command line ---------------------------------------------------------------------------------
def test_cli_help_and_defaults(capsys):
    import dataclasses

    from lmforge.cli import build_parser, main

    with pytest.raises(SystemExit) as e:
        main(["ppo", "--help"])
    assert e.value.code == 0 and "--reward-model" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "ppo" in capsys.readouterr().out
    args = build_parser().parse_args(["ppo", "--model", "m", "--prompts", "p"])
    d = PPOConfig()
    for f in dataclasses.fields(PPOConfig):
        if hasattr(args, f.name):
            assert getattr(args, f.name) == getattr(d, f.name), f.name  # the CLI's defaults are PPOConfig's


def test_cli_smoke(tok, tmp_path, capsys):
    from lmforge import save_model
    from lmforge.cli import main

    save_model(tiny_model(), tmp_path / "m", tokenizer=tok)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Answer {i}"}], "answer": str(i)})
                               + "\n" for i in range(6)))
    base = ["ppo", "--model", str(tmp_path / "m"), "--prompts", str(prompts), "--steps", "2",
            "--rollout-batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens", "2"]
    assert main(base + ["--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "mean reward" in out and (tmp_path / "run" / "model" / "config.json").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    # resume a finished run: nothing left to do, still succeeds
    assert main(base + ["--out", str(tmp_path / "run"), "--resume"]) == 0
    capsys.readouterr()
    # a reward model instead of a reward function
    save_reward_model(RewardModel(tiny_model(seed=3)), tmp_path / "rm", tokenizer=tok)
    assert main(base + ["--out", str(tmp_path / "run_rm"), "--reward-model", str(tmp_path / "rm")]) == 0
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "x"), "--reward", "nonsense"]) == 2
    assert "--reward 'nonsense'" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "x"), "--mini-batch-size", "3"]) == 2
    assert "multiple of 'mini_batch_size'" in capsys.readouterr().err


class _FullLogitsPPO(PPOTrainer):
    """PPO's forwards as they were: the masked forward with logits and values on every position (cut to the
    completion tokens afterwards, where the loss reads them)."""

    def forward_rows(self, batch, module=None, logits_to_keep=None, **kwargs):
        out = self.harness.forward(batch, module)
        if isinstance(out, tuple):
            return tuple(o[logits_to_keep] for o in out)
        return out[logits_to_keep]


def test_completion_only_forward_matches_the_full_one(tok, tmp_path):
    prompts = [{"messages": [{"role": "user", "content": "Answer yes or no." + " maybe" * i}], "answer": "yes"}
               for i in range(4)]
    kw = dict(steps=2, rollout_batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=4, lr=1e-2, seed=0,
              save_every=0, progress=False, kl_coef=0.05)
    new = PPOTrainer(tiny_model(), tok, prompts, starts_lowercase, PPOConfig(**kw), tmp_path / "new")
    old = _FullLogitsPPO(tiny_model(), tok, prompts, starts_lowercase, PPOConfig(**kw), tmp_path / "old")
    for step in range(kw["steps"]):
        r_new, r_old = new.rollout(step), old.rollout(step)
        assert torch.equal(r_new.batch["input_ids"], r_old.batch["input_ids"])
        assert (r_new.batch["attention_mask"] == 0).any()
        for k in ("old_logps", "old_values", "returns"):
            torch.testing.assert_close(r_new.batch[k], r_old.batch[k], rtol=0, atol=1e-5, msg=k)
        torch.testing.assert_close(r_new.advantages, r_old.advantages, rtol=0, atol=1e-4)
        u_new, u_old = new.update(r_new, step), old.update(r_old, step)
        for k in ("loss", "policy_loss", "value_loss", "grad_norm"):
            assert u_new[k] == pytest.approx(u_old[k], rel=1e-4, abs=1e-6), k
        new.update_reference(), old.update_reference()
    for (name, p), q in zip(new.module.named_parameters(), old.module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
