"""Pairwise LLM-as-judge: position-debiased preferences, (length-controlled) win rate, Bradley–Terry/Elo.

* A judge is any ``judge(prompt, first, second) -> P(first is better)``. ``LogprobJudge`` builds one from a
  local model: the probability mass on " A" vs " B" after a judging prompt.
* ``pairwise_preferences`` asks in both orders and averages ``(p(a, b) + 1 - p(b, a)) / 2``, which cancels
  a judge's preference for a position; the per-item disagreement is returned too.
* ``length_controlled_win_rate`` (AlpacaEval-LC style, without the per-instruction term): fit
  ``P(a wins) = sigmoid(θ0 + θ1 · tanh(Δlen / sd(Δlen)))`` by logistic regression on the (soft)
  preferences and report ``sigmoid(θ0)``, the win rate predicted at equal lengths.
* ``bradley_terry`` fits strengths from battles between several models, reported on the Elo scale
  (400 · log10, mean 1000) with seeded bootstrap percentile intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError

Judge = Callable[[str, str, str], float]

JUDGE_TEMPLATE = ("Which response answers the instruction better?\n\nInstruction: {prompt}\n\n"
                  "Response A: {first}\n\nResponse B: {second}\n\nThe better response is")


class LogprobJudge:
    """P(first better) from a causal LM: softmax over the log-likelihoods of " A" and " B"."""

    def __init__(self, model: Any, tokenizer: Any, template: str = JUDGE_TEMPLATE) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template

    def __call__(self, prompt: str, first: str, second: str) -> float:
        from lmforge.eval.scoring import loglikelihood

        ctx = self.template.format(prompt=prompt, first=first, second=second)
        (la, _), (lb, _) = loglikelihood(self.model, self.tokenizer, [(ctx, " A"), (ctx, " B")])
        return 1.0 / (1.0 + math.exp(lb - la))


class EndpointJudge:
    """A judge behind any OpenAI-compatible endpoint (an ``lmforge serve``, vLLM, or a hosted API).

    Asks for a one-letter verdict; with logprobs available, P(first better) is the renormalised mass on
    "A" vs "B" among the top alternatives, otherwise the verdict counts as 1 or 0 (0.5 if it is neither).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, template: str = JUDGE_TEMPLATE,
                 timeout: float = 60.0, use_logprobs: bool = True) -> None:
        try:
            import openai
        except ImportError:
            raise LmforgeError("an endpoint judge needs the openai package: pip install openai") from None
        self._openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=1)
        self.base_url, self.model, self.template, self.use_logprobs = base_url, model, template, use_logprobs

    def __call__(self, prompt: str, first: str, second: str) -> float:
        content = self.template.format(prompt=prompt, first=first, second=second) + " (answer A or B)"
        kwargs: dict[str, Any] = {"logprobs": True, "top_logprobs": 5} if self.use_logprobs else {}
        try:
            r = self.client.chat.completions.create(model=self.model, max_tokens=1, temperature=0.0,
                                                    messages=[{"role": "user", "content": content}], **kwargs)
        except self._openai.APIConnectionError as e:
            raise LmforgeError(f"judge endpoint {self.base_url} is unreachable ({e.__cause__ or e})") from None
        except self._openai.APIStatusError as e:
            raise LmforgeError(f"judge endpoint {self.base_url} answered {e.status_code}: {e.message}") from None
        choice = r.choices[0]
        tops = getattr(getattr(choice, "logprobs", None), "content", None)
        if tops:
            mass = {"A": 0.0, "B": 0.0}
            for alt in tops[0].top_logprobs:
                key = alt.token.strip().upper()[:1]
                if key in mass:
                    mass[key] += math.exp(alt.logprob)
            if mass["A"] + mass["B"] > 0:
                return mass["A"] / (mass["A"] + mass["B"])
        verdict = (choice.message.content or "").strip().upper()[:1]
        return {"A": 1.0, "B": 0.0}.get(verdict, 0.5)


@dataclass
class Preferences:
    """``p[i]``: P(a beats b) on item i, position-debiased; ``disagreement[i]``: |p(a,b) - (1 - p(b,a))|."""

    p: np.ndarray
    disagreement: np.ndarray


def pairwise_preferences(judge: Judge, prompts: Sequence[str], outputs_a: Sequence[str],
                         outputs_b: Sequence[str]) -> Preferences:
    if not len(prompts) == len(outputs_a) == len(outputs_b):
        raise LmforgeError(f"{len(prompts)} prompts, {len(outputs_a)} and {len(outputs_b)} outputs: lengths differ")
    ab = np.array([judge(q, a, b) for q, a, b in zip(prompts, outputs_a, outputs_b)], dtype=np.float64)
    ba = np.array([judge(q, b, a) for q, a, b in zip(prompts, outputs_a, outputs_b)], dtype=np.float64)
    return Preferences(p=(ab + 1.0 - ba) / 2.0, disagreement=np.abs(ab - (1.0 - ba)))


def win_rate(p: Sequence[float]) -> float:
    """Mean preference for a (a soft 0.5 counts as a tie)."""
    return float(np.mean(p))


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 100) -> np.ndarray:
    """Newton's method for logistic regression with soft labels ``y`` in [0, 1] (small ridge for stability)."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def length_controlled_win_rate(p: Sequence[float], len_a: Sequence[int], len_b: Sequence[int]) -> float:
    """Win rate of a over b with the effect of the length difference regressed out (see module doc)."""
    p_arr = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    diff = np.asarray(len_a, dtype=np.float64) - np.asarray(len_b, dtype=np.float64)
    sd = diff.std()
    feature = np.tanh(diff / sd) if sd > 0 else np.zeros_like(diff)
    w = _fit_logistic(np.stack([np.ones_like(diff), feature], axis=1), p_arr)
    return float(1.0 / (1.0 + math.exp(-w[0])))


def _bt_strengths(battles: np.ndarray, n_models: int, l2: float = 1e-4) -> np.ndarray:
    """Log-strengths from rows (i, j, P(i beats j)); the first model is pinned at 0 for identifiability."""
    x = np.zeros((len(battles), n_models))
    rows = np.arange(len(battles))
    x[rows, battles[:, 0].astype(int)] += 1.0
    x[rows, battles[:, 1].astype(int)] -= 1.0
    w = _fit_logistic(x[:, 1:], battles[:, 2], l2=l2)
    return np.concatenate([[0.0], w])


def bradley_terry(battles: Sequence[tuple[str, str, float]], iters: int = 200, seed: int = 1234,
                  ci: float = 0.95) -> dict[str, dict[str, float]]:
    """Elo-scale ratings with bootstrap intervals from (model_i, model_j, P(i beats j)) battles."""
    if not battles:
        raise LmforgeError("no battles to rate")
    names = sorted({m for b in battles for m in b[:2]})
    index = {n: i for i, n in enumerate(names)}
    arr = np.array([(index[a], index[b], float(s)) for a, b, s in battles], dtype=np.float64)

    def elo(rows: np.ndarray) -> np.ndarray:
        s = _bt_strengths(rows, len(names)) * 400.0 / math.log(10.0)
        return s - s.mean() + 1000.0

    point = elo(arr)
    rng = np.random.default_rng(seed)
    boot = np.array([elo(arr[rng.integers(0, len(arr), len(arr))]) for _ in range(iters)])
    lo, hi = np.percentile(boot, [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    return {n: {"elo": float(point[i]), "lower": float(lo[i]), "upper": float(hi[i])} for n, i in index.items()}
