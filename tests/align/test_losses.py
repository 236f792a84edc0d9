"""Alignment losses against their papers' formulas, evaluated by hand with ``math``."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.align.losses import (bradley_terry_loss, dpo_loss, gae, group_advantages, grpo_loss, kl_penalty,
                                  ppo_policy_loss, ppo_value_loss, sequence_logprobs, simpo_loss, whiten,
                                  with_chosen_nll)
from lmforge.errors import LmforgeError
from lmforge.data.sft import IGNORE_INDEX


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def _close(a: torch.Tensor | float, b: float, tol: float = 1e-6) -> bool:
    a = a.detach() if isinstance(a, torch.Tensor) else a
    return abs(float(a) - b) < tol


# ---- sequence log-probs --------------------------------------------------------------------------
def test_sequence_logprobs_sum_and_mean_over_targets_only():
    rows = [[1.0, 2.0, 0.5], [0.0, 0.0, 3.0], [9.0, -9.0, 0.0]]
    logits = torch.tensor([rows, rows])
    labels = torch.tensor([[1, IGNORE_INDEX, 0], [IGNORE_INDEX, IGNORE_INDEX, 2]])

    def lp(row, k):
        return row[k] - math.log(sum(math.exp(v) for v in row))

    want0 = lp(rows[0], 1) + lp(rows[2], 0)
    want1 = lp(rows[2], 2)
    got = sequence_logprobs(logits, labels)
    assert got.dtype == torch.float32 and _close(got[0], want0, 1e-5) and _close(got[1], want1, 1e-5)
    avg = sequence_logprobs(logits.to(torch.bfloat16), labels, average=True)
    assert avg.dtype == torch.float32
    assert _close(avg[0], want0 / 2, 0.05) and _close(avg[1], want1, 0.05)


def test_sequence_logprobs_all_ignored_is_zero_not_nan():
    out = sequence_logprobs(torch.randn(1, 3, 4), torch.full((1, 3), IGNORE_INDEX), average=True)
    assert out.tolist() == [0.0]


# ---- Bradley-Terry -------------------------------------------------------------------------------
def test_bradley_terry_loss_and_accuracy():
    loss, acc = bradley_terry_loss(_t(2.0, 0.0, 1.0), _t(1.0, 0.5, 1.0))
    want = -(_logsig(1.0) + _logsig(-0.5) + _logsig(0.0)) / 3
    assert _close(loss, want) and _close(acc, 1 / 3)


# ---- DPO / IPO / SimPO ---------------------------------------------------------------------------
PC, PR, RC, RR = _t(-5.0, -3.0), _t(-7.0, -2.0), _t(-6.0, -3.5), _t(-6.5, -2.5)


def test_dpo_sigmoid_matches_formula_and_rewards():
    beta = 0.1
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta)
    for i in range(2):
        h = (PC[i].item() - RC[i].item()) - (PR[i].item() - RR[i].item())
        assert _close(losses[i], -_logsig(beta * h))
        assert _close(cr[i], beta * (PC[i].item() - RC[i].item()))
        assert _close(rr[i], beta * (PR[i].item() - RR[i].item()))
    assert not cr.requires_grad


def test_dpo_label_smoothing_zero_is_plain_dpo_and_positive_is_conservative():
    plain, _, _ = dpo_loss(PC, PR, RC, RR, 0.5)
    assert torch.equal(dpo_loss(PC, PR, RC, RR, 0.5, label_smoothing=0.0)[0], plain)
    eps, beta = 0.1, 0.5
    smoothed, _, _ = dpo_loss(PC, PR, RC, RR, beta, label_smoothing=eps)
    h = (PC[0].item() - RC[0].item()) - (PR[0].item() - RR[0].item())  # = 1.5
    assert _close(smoothed[0], -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h))


def test_ipo_is_zero_at_its_target_margin_and_quadratic_elsewhere():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    losses, _, _ = dpo_loss(_t(0.0, 0.0), _t(-2.0, -1.0), _t(0.0, 0.0), _t(0.0, 0.0), beta, loss_type="ipo")
    assert losses[0].item() == 0.0
    assert _close(losses[1], (1.0 - 2.0) ** 2)


def test_dpo_rejects_bad_arguments():
    with pytest.raises(LmforgeError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, 0.1, loss_type="hinge")
    with pytest.raises(LmforgeError, match="beta"):
        dpo_loss(PC, PR, RC, RR, 0.0)
    with pytest.raises(LmforgeError, match="shape"):
        dpo_loss(PC, PR[:1], RC, RR, 0.1)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, 0.1)[0].sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_simpo_matches_formula():
    beta, gamma = 2.0, 0.5
    losses = simpo_loss(_t(-0.5, -1.0), _t(-0.75, -0.5), beta, gamma)
    assert _close(losses[0], -_logsig(beta * 0.25 - gamma))
    assert _close(losses[1], -_logsig(beta * -0.5 - gamma))


def test_chosen_nll_term_is_per_token_nll_of_the_chosen_answer():
    """DPO+NLL (Pang et al. 2024): pref_loss + w * (-log pi(y_w|x) / |y_w|), per pair."""
    losses, _, _ = dpo_loss(PC, PR, RC, RR, 0.1)
    out = with_chosen_nll(losses, PC, torch.tensor([2, 4]), nll_weight=0.5)
    assert _close(out[0], losses[0].item() + 0.5 * 5.0 / 2)
    assert _close(out[1], losses[1].item() + 0.5 * 3.0 / 4)
    assert with_chosen_nll(losses, PC, torch.tensor([2, 4]), 0.0) is losses
    pc = PC.clone().requires_grad_()
    with_chosen_nll(torch.zeros(2, dtype=torch.float64), pc, torch.tensor([2, 4]), 1.0).sum().backward()
    assert torch.allclose(pc.grad, _t(-0.5, -0.25))  # raising the chosen log-prob lowers the loss
    with pytest.raises(LmforgeError, match="nll_weight"):
        with_chosen_nll(losses, PC, torch.tensor([2, 4]), -1.0)


# ---- GAE -----------------------------------------------------------------------------------------
def test_gae_three_steps_by_hand():
    g, lam = 0.9, 0.8
    r, v = [0.0, 0.5, 1.0], [0.2, 0.4, 0.6]
    d2 = r[2] + g * 0.0 - v[2]  # bootstrap 0 after the last valid token
    d1 = r[1] + g * v[2] - v[1]
    d0 = r[0] + g * v[1] - v[0]
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    # Right padding (last two columns) and left padding (first column) around the same episode.
    rewards = torch.tensor([[*r, 7.0, 7.0], [7.0, *r, 7.0]])
    values = torch.tensor([[*v, 3.0, 3.0], [3.0, *v, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, g, lam)
    want = [a0, a1, a2]
    assert torch.allclose(adv[0], torch.tensor([*want, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(adv[1], torch.tensor([0.0, *want, 0.0]), atol=1e-6)
    assert torch.allclose(ret[0, :3], torch.tensor([a + b for a, b in zip(want, v)]), atol=1e-6)
    assert ret[0, 3:].abs().sum() == 0


def test_gae_skips_masked_tokens_inside_a_response():
    rewards, values = torch.tensor([[0.0, 9.0, 1.0]]), torch.tensor([[0.5, 9.0, 0.25]])
    adv, _ = gae(rewards, values, torch.tensor([[1, 0, 1]]), 1.0, 1.0)
    # With gamma = lambda = 1 the advantage is the return to go minus V: 1 - 0.5 and 1 - 0.25.
    assert torch.allclose(adv, torch.tensor([[0.5, 0.0, 0.75]]))


# ---- PPO -----------------------------------------------------------------------------------------
def test_ppo_policy_loss_value_and_clipped_side_has_no_gradient():
    eps = 0.2
    ratios = [1.5, 0.5, 1.5, 1.1]  # clipped (A>0), clipped (A<0), unclipped (A<0), inside the range
    adv = [1.0, -1.0, -1.0, 2.0]
    old = torch.zeros(1, 5)
    logp = torch.tensor([[*(math.log(x) for x in ratios), 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clip_frac, kl = ppo_policy_loss(logp, old, torch.tensor([[*adv, 100.0]]), mask, eps)
    per_token = [max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)) for r, a in zip(ratios, adv)]
    assert _close(loss, sum(per_token) / 4, 1e-5)
    assert _close(clip_frac, 2 / 4)
    assert _close(kl, sum((r - 1) - math.log(r) for r in ratios) / 4, 1e-5)
    loss.backward()
    g = logp.grad[0]
    assert g[0] == 0 and g[1] == 0 and g[4] == 0  # clipped side and the masked token
    assert _close(g[2], 1.0 * 1.5 / 4, 1e-5) and _close(g[3], -2.0 * 1.1 / 4, 1e-5)  # d/dlogp of -A*r


def test_ppo_value_loss_takes_the_pessimistic_branch():
    values, old, returns = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: unclipped (1-2)^2 = 1, clipped (0.5-2)^2 = 2.25 -> 2.25; token 1: both (0-1)^2 = 1.
    assert _close(ppo_value_loss(values, old, returns, mask, 0.5), 0.5 * (2.25 + 1.0) / 2)


# ---- KL estimators -------------------------------------------------------------------------------
def test_kl_estimators_on_hand_numbers_and_k3_nonnegative():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    for i in range(3):
        log_r = ref[i].item() - logp[i].item()
        assert _close(kl_penalty(logp, ref, "k1")[i], -log_r)
        assert _close(kl_penalty(logp, ref, "k2")[i], 0.5 * log_r**2)
        assert _close(kl_penalty(logp, ref, "k3")[i], math.exp(log_r) - log_r - 1)
    wide = torch.linspace(-20, 5, 101)
    assert (kl_penalty(wide, wide.flip(0), "k3") >= 0).all()
    assert kl_penalty(wide, wide, "k3").abs().max() == 0
    with pytest.raises(LmforgeError, match="k4"):
        kl_penalty(logp, ref, "k4")


# ---- whitening -----------------------------------------------------------------------------------
def test_whiten_uses_only_masked_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    vals = [1.0, 2.0, 3.0, 4.0]
    mean = sum(vals) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 3)
    out = whiten(x, mask)
    assert torch.allclose(out[mask.bool()], torch.tensor([(v - mean) / std for v in vals]), atol=1e-5)
    assert out[~mask.bool()].abs().sum() == 0
    scaled = whiten(x, mask, shift_mean=False)
    assert torch.allclose(scaled[mask.bool()], torch.tensor([(v - mean) / std + mean for v in vals]), atol=1e-5)


def test_whiten_constant_input_gives_zeros_not_nan():
    out = whiten(torch.full((2, 3), 0.7), torch.ones(2, 3))
    assert torch.equal(out, torch.zeros(2, 3))
    assert torch.isfinite(whiten(torch.tensor([[5.0]]), torch.tensor([[1]]))).all()


# ---- GRPO ----------------------------------------------------------------------------------------
def test_group_advantages_by_hand_and_degenerate_groups():
    r = [1.0, 0.0, 0.0, 1.0, 1.0]
    mean = sum(r) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 4)
    adv = group_advantages(torch.tensor([r, [0.1] * 5]), eps=1e-6)
    assert torch.allclose(adv[0], torch.tensor([(x - mean) / (std + 1e-6) for x in r]), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(5))  # all equal: exactly zero, no rounding noise
    assert torch.allclose(group_advantages(torch.tensor([r]), scale=False)[0], torch.tensor([x - mean for x in r]))
    single = group_advantages(torch.tensor([[3.0], [4.0]]))
    assert torch.equal(single, torch.zeros(2, 1))
    with pytest.raises(LmforgeError, match="NaN"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))


def test_grpo_loss_per_sequence_mean_by_hand():
    eps, beta = 0.2, 0.1
    logp = torch.tensor([[math.log(1.5), 0.0, 0.0], [math.log(0.9), math.log(1.1), 0.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    ref = torch.tensor([[0.0, -0.5, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0])
    loss, clip_frac, kl = grpo_loss(logp, old, ref, adv, mask, eps, beta)

    def tok(lp, rf, a):
        r = math.exp(lp)
        surr = min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
        k3 = math.exp(rf - lp) - (rf - lp) - 1
        return -(surr - beta * k3), k3

    lps = [[math.log(1.5), 0.0], [math.log(0.9), math.log(1.1), 0.0]]
    refs = [[0.0, -0.5], [0.0, 0.0, 0.0]]
    seq_losses, kls = [], []
    for i, a in enumerate([1.0, -2.0]):
        parts = [tok(lp, rf, a) for lp, rf in zip(lps[i], refs[i])]
        seq_losses.append(sum(p[0] for p in parts) / len(parts))
        kls += [p[1] for p in parts]
    assert _close(loss, sum(seq_losses) / 2, 1e-5)
    assert _close(kl, sum(kls) / len(kls), 1e-5)
    assert _close(clip_frac, 1 / 5)  # only ratio 1.5 with A > 0 is clipped
    loss.backward()
    assert logp.grad[0, 2] == 0  # masked


def test_grpo_without_kl_needs_no_reference_and_equal_advantages_give_zero_loss():
    logp = torch.randn(2, 4)
    loss, _, kl = grpo_loss(logp, logp, None, torch.zeros(2), torch.ones(2, 4), 0.2, 0.0)
    assert loss.item() == 0.0 and kl.item() == 0.0
    with pytest.raises(LmforgeError, match="ref_logprobs"):
        grpo_loss(logp, logp, None, torch.zeros(2), torch.ones(2, 4), 0.2, 0.04)


def test_token_logprobs_at_matches_full_logits():
    from lmforge.align.losses import token_logprobs, token_logprobs_at

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = IGNORE_INDEX
    labels[2, 3:] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    full = token_logprobs(logits, labels)
    (g_full,) = torch.autograd.grad(full.sum(), logits)
    sub = logits[keep]  # what a model returns for logits_to_keep=keep
    at = token_logprobs_at(sub, labels)
    (g_at,) = torch.autograd.grad(at.sum(), logits)
    torch.testing.assert_close(at, full.masked_fill(~keep, 0.0))
    torch.testing.assert_close(g_at, g_full)
    assert (at[~keep] == 0).all()
    with pytest.raises(LmforgeError, match="one row per label"):
        token_logprobs_at(logits[:, :2].flatten(0, 1), labels)
