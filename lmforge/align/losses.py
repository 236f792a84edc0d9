"""Alignment objectives: pure functions of tensors (reward modelling, DPO family, PPO, GRPO).

Conventions:

* Sequence-level losses (Bradley-Terry, DPO, IPO, SimPO) take one number per sequence, usually the
  summed (or length-averaged) log-probability of the completion from ``sequence_logprobs``, and return
  per-example losses ``[B]``; the caller reduces, so it controls weighting across accumulation steps.
* Token-level losses (PPO, GRPO) take ``[B, T]`` tensors plus a ``mask`` that is 1 on response tokens
  the policy generated and 0 on prompt and padding; masked positions never contribute a value or a
  gradient.
* Everything is computed in float32 whatever the input dtype: differences of log-probabilities are
  small numbers taken between large ones, which bf16 cannot resolve.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.data.sft import IGNORE_INDEX

DPOLossType = Literal["sigmoid", "ipo"]
KLKind = Literal["k1", "k2", "k3"]


# ---- helpers -------------------------------------------------------------------------------------
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is set; ``where`` rather than ``x * mask`` so NaN/inf outside the
    mask (e.g. a ratio on padding) cannot leak in."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over masked positions; 0 (not NaN) where the mask is empty."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise LmforgeError(f"shape mismatch: {', '.join(f'{k}={v}' for k, v in shapes.items())}")


# ---- log-probabilities ---------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, t] | prefix) per position ``[B, T]``, 0 where the label is IGNORE_INDEX.

    ``labels`` are aligned with ``logits`` (labels[:, t] is the target for position t). Uses
    ``cross_entropy`` (a fused log-softmax + gather) so no ``[B, T, V]`` log-prob tensor is kept
    for the backward pass beyond what cross-entropy itself needs.
    """
    if logits.shape[:-1] != labels.shape:
        raise LmforgeError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    nll = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return -nll.view(labels.shape)


def scatter_at(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values [N]`` at the True positions of ``mask [B, T]`` (row-major, as a boolean ``logits_to_keep`` orders
    them) -> ``[B, T]``, 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def token_logprobs_at(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``token_logprobs`` from logits computed at the labelled positions only: ``logits [N, vocab]`` for the N
    positions where ``labels [B, T]`` is not IGNORE_INDEX, row-major (what a model returns for the boolean
    ``logits_to_keep = labels != IGNORE_INDEX``). Returns ``[B, T]``, 0 off the labels, the same values as
    ``token_logprobs`` on the full logits: the LM head and the softmax skip the prompt and the padding."""
    keep = labels != IGNORE_INDEX
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise LmforgeError(f"logits {tuple(logits.shape)} are not one row per label of {tuple(labels.shape)} "
                           f"({int(keep.sum())} labels)")
    nll = F.cross_entropy(logits.float(), labels[keep], reduction="none")
    return scatter_at(-nll, keep)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log pi(y | x) of each sequence ``[B]``: the sum (or, with ``average``, the mean) of the target
    tokens' log-probabilities. Length-averaged values are what IPO and SimPO expect."""
    logps = token_logprobs(logits, labels)
    total = logps.sum(-1)
    if not average:
        return total
    return total / (labels != IGNORE_INDEX).sum(-1).clamp(min=1)


# ---- reward modelling ----------------------------------------------------------------------------
def bradley_terry_loss(chosen_rewards: torch.Tensor,
                       rejected_rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1).

        loss = -mean log sigmoid(r_chosen - r_rejected)

    Returns ``(loss, accuracy)``: the scalar mean loss and the fraction of pairs where the chosen
    completion scores strictly higher (detached; a tie counts as wrong).
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    margin = chosen_rewards.float() - rejected_rewards.float()
    # logsigmoid is the stable form of log(1 / (1 + exp(-m))) for large |m|.
    loss = -F.logsigmoid(margin).mean()
    accuracy = (margin > 0).float().mean().detach()
    return loss, accuracy


# ---- DPO family ----------------------------------------------------------------------------------
def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0,
             loss_type: DPOLossType = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization losses ``[B]`` plus the implicit rewards.

    With the log-ratio difference
        h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)):

    * ``"sigmoid"`` -- DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * h)``. With
      ``label_smoothing`` eps > 0 it is conservative DPO (Mitchell 2023), which assumes each preference
      label is flipped with probability eps: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    * ``"ipo"`` -- IPO (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta))^2``, which regresses the
      margin to a finite target instead of pushing it to infinity. IPO is defined on length-averaged
      log-probabilities: pass ``sequence_logprobs(..., average=True)`` for all four inputs.

    Returns ``(losses, chosen_rewards, rejected_rewards)`` where the implicit rewards
    ``beta * (log pi - log pi_ref)`` are detached (for logging reward accuracy and margins).
    """
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    if beta <= 0:
        raise LmforgeError(f"dpo beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        # At eps = 0.5 the two terms cancel in expectation and the loss carries no preference.
        raise LmforgeError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing > 0:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise LmforgeError("label_smoothing applies to the sigmoid DPO loss, not to IPO")
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise LmforgeError(f"unknown DPO loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def with_chosen_nll(losses: torch.Tensor, chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor,
                     nll_weight: float) -> torch.Tensor:
    """Preference losses ``[B]`` plus a weighted negative log-likelihood of the chosen completion, per token:

        loss_i = pref_loss_i + nll_weight * ( -log pi(y_w | x) / |y_w| )

    The DPO+NLL objective of Pang et al. 2024 ("Iterative Reasoning Preference Optimization", eq. 1-3;
    TRL calls the weight ``rpo_alpha``). Plain DPO only moves the log-ratio *difference*, so on pairs that
    differ in a token or two it can lower the chosen answer's probability along with the rejected one's;
    the NLL term keeps the chosen answer likely. ``chosen_logps`` are sums over ``chosen_tokens`` targets
    (pass ``chosen_tokens`` = 1 for already length-averaged log-probs); ``nll_weight`` 0 returns ``losses``.
    """
    if nll_weight < 0:
        raise LmforgeError(f"nll_weight must be >= 0, got {nll_weight}")
    if nll_weight == 0:
        return losses
    _check_same_shape(losses=losses, chosen_logps=chosen_logps)
    return losses - nll_weight * chosen_logps.float() / chosen_tokens.clamp(min=1).to(chosen_logps.device)


def simpo_loss(policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor,
               beta: float, gamma: float) -> torch.Tensor:
    """SimPO losses ``[B]`` (Meng et al. 2024, eq. 6), reference-free:

        loss = -log sigmoid(beta * (avg_logp(y_w) - avg_logp(y_l)) - gamma)

    Inputs are length-averaged log-probabilities (``sequence_logprobs(..., average=True)``); the
    averaging is what keeps the implicit reward from favouring long completions. ``gamma`` is the
    target reward margin, in reward units (some codebases pass ``gamma / beta`` instead).
    """
    _check_same_shape(policy_chosen_avg_logps=policy_chosen_avg_logps,
                      policy_rejected_avg_logps=policy_rejected_avg_logps)
    if beta <= 0:
        raise LmforgeError(f"simpo beta must be > 0, got {beta}")
    margin = policy_chosen_avg_logps.float() - policy_rejected_avg_logps.float()
    return -F.logsigmoid(beta * margin - gamma)


# ---- PPO -----------------------------------------------------------------------------------------
@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16), per token ``[B, T]``:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}

    Only positions where ``mask`` is set are steps of the episode: the recursion runs over them as if
    they were contiguous (so left or right padding, or masked tool-output tokens inside a response,
    are skipped), and after the last valid token V = 0 and A = 0 (the episode ends there, nothing to
    bootstrap). Rewards at masked positions are ignored: put the sequence reward on a valid token.
    Returns ``(advantages, returns)`` with ``returns = A + V``, both 0 outside the mask; no gradient.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    rewards, values, valid = rewards.float(), values.float(), mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    # A sequential scan over T; it is vectorised over the batch and T is a response length.
    for t in range(values.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        keep = valid[:, t]
        advantages[:, t] = torch.where(keep, adv, torch.zeros_like(adv))
        # A masked step is not a step: carry the successor's value and advantage past it.
        next_value = torch.where(keep, values[:, t], next_value)
        next_adv = torch.where(keep, adv, next_adv)
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to unit variance over the masked positions (PPO advantage normalisation).

    ``(x - mean) / sqrt(var + eps)`` with the masked mean and the unbiased masked variance; with
    ``shift_mean=False`` the mean is added back (scale only). Constant inputs give 0 (the numerator is
    exactly 0), never NaN; a single valid element has variance 0. Positions outside the mask are 0.
    """
    _check_same_shape(x=x, mask=mask)
    valid = mask.bool()
    x = x.float()
    n = valid.sum()
    mean = masked_mean(x, valid)
    centered = torch.where(valid, x - mean, torch.zeros_like(x))
    var = (centered**2).sum() / (n - 1).clamp(min=1)  # Bessel's correction, as for torch.var
    out = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        out = torch.where(valid, out + mean, out)
    return out


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio = exp(logp - logp_old)
        loss  = mean_t max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))

    averaged over all valid tokens of the batch (one token mean, not per-sequence). Where the clipped
    branch is the max, the token contributes no gradient, which is what stops the policy moving more
    than ``eps`` away from the one that sampled the data.

    Returns ``(loss, clip_fraction, approx_kl)``: the share of valid tokens where clipping is active,
    and Schulman's k3 estimate of KL(pi_old || pi), ``(ratio - 1) - log ratio`` (both detached).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_eps: float) -> torch.Tensor:
    """Clipped value loss (as in OpenAI baselines' PPO2):

        V_clip = V_old + clip(V - V_old, -eps, eps)
        loss   = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

    averaged over valid tokens. Taking the max makes the clip pessimistic: moving V more than ``eps``
    from ``V_old`` cannot lower the loss.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    per_token = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(per_token, mask)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (J. Schulman, "Approximating
    KL Divergence", 2020). With x ~ q = pi, p = pi_ref and r = p(x) / q(x) = exp(ref_logp - logp):

    * ``"k1"``: ``-log r`` = logp - ref_logp (unbiased, high variance, can be negative)
    * ``"k2"``: ``(log r)^2 / 2`` (biased, low variance, >= 0)
    * ``"k3"``: ``(r - 1) - log r`` (unbiased, low variance, >= 0 since log r <= r - 1)

    Not masked or reduced: the caller masks (e.g. ``masked_mean``) or adds it to per-token rewards.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_r = ref_logprobs.float() - logprobs.float()
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r  # expm1: exact near r = 1, where the KL is tiny
    raise LmforgeError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


# ---- GRPO ----------------------------------------------------------------------------------------
@torch.no_grad()
def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath section 4.1.2) for ``[num_prompts, G]``
    rewards, G completions per prompt:

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    with the unbiased group std; ``scale=False`` only centres (Dr. GRPO, Liu et al. 2025, which argues
    the std division over-weights nearly-solved prompts). A group whose rewards are all equal carries
    no signal and gets exactly 0 (not mean-rounding noise, never NaN); so does a group of size 1.
    """
    if rewards.dim() != 2:
        raise LmforgeError(f"group rewards must be [num_prompts, group_size], got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        raise LmforgeError("group rewards contain NaN or inf; skip those samples before computing advantages")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale and rewards.shape[1] > 1:
        centered = centered / (rewards.std(dim=1, keepdim=True) + eps)
    constant = (rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True))
    return torch.where(constant, torch.zeros_like(centered), centered)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO objective (Shao et al. 2024, eq. 3), as a loss to minimise, for ``[B, T]`` token tensors
    and one advantage per sequence ``advantages [B]`` (broadcast over its tokens):

        per token: -( min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - beta * k3(pi || pi_ref) )
        loss = mean_i ( 1/|o_i| * sum_t per_token[i, t] )

    Normalisation: the paper's -- a mean over each sequence's valid tokens, then a mean over sequences,
    so every completion weighs the same whatever its length (a sequence with no valid token adds 0).
    ``ref_logprobs`` may be None when ``beta == 0`` (no reference model needed).

    Returns ``(loss, clip_fraction, kl)``: the share of valid tokens where clipping is active and the
    mean per-token k3 KL to the reference (0 without one), both detached token means.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    if advantages.shape != logprobs.shape[:1]:
        raise LmforgeError(f"advantages must be one per sequence {tuple(logprobs.shape[:1])}, "
                           f"got {tuple(advantages.shape)}")
    ratio = torch.exp(logprobs.float() - old_logprobs.float())
    adv = advantages.float().unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if beta != 0.0:
        if ref_logprobs is None:
            raise LmforgeError("grpo_loss needs ref_logprobs when beta != 0")
        kl = kl_penalty(logprobs, ref_logprobs, "k3")
        per_token = per_token + beta * kl
    else:
        kl = kl_penalty(logprobs, ref_logprobs, "k3") if ref_logprobs is not None else torch.zeros_like(ratio)
    loss = masked_mean(per_token, mask, dim=1).mean()
    with torch.no_grad():
        clip_fraction = masked_mean((clipped < unclipped).float(), mask)
        mean_kl = masked_mean(kl.detach(), mask)
    return loss, clip_fraction, mean_kl


__all__ = ["bradley_terry_loss", "dpo_loss", "gae", "group_advantages", "grpo_loss", "kl_penalty", "masked_mean",
           "masked_sum", "ppo_policy_loss", "ppo_value_loss", "scatter_at", "sequence_logprobs", "simpo_loss",
           "token_logprobs", "token_logprobs_at", "whiten", "with_chosen_nll"]
