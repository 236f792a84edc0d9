"""Test-time compute: sample several completions of one prompt through the engine and pick one.

    from lmforge.engine.strategies import RewardScorer, best_of_n, self_consistency, step_beam_search

    params = SamplingParams(temperature=0.8, max_tokens=64, seed=0)
    r = self_consistency(model, prompt_ids, n=16, params=params, tokenizer=tok, extract=r"answer: (\\d+)")
    r.answer, r.votes, r.best.text, r.usage.generated_tokens
    r = best_of_n(model, prompt_ids, 16, params, RewardScorer(load_reward_model(path), tok), tok)
    r = step_beam_search(model, prompt_ids, scorer, beam_width=4, expansions_per_beam=4, tokenizer=tok)

Strategies:

* ``self_consistency`` -- majority vote over extracted answers (Wang et al. 2022);
* ``best_of_n`` -- the candidate a scorer rates highest: a verifier ``fn(prompt, completion) -> float`` or a
  Bradley-Terry reward model (``RewardScorer``);
* ``weighted_majority`` -- answers vote with weight ``exp(score)`` (or the raw score);
* ``step_beam_search`` -- PRM-style search: every beam is extended by sampled steps that end at a delimiter,
  partial solutions are scored, the best ``beam_width`` survive.

Every run uses one ``Engine``: the N samples of a prompt share its KV blocks through the prefix cache, and a
beam step's requests reuse the KV computed for the beam so far. ``StrategyResult.usage`` reports the
engine's counters for the run: prompt tokens requested vs computed (the rest came from the cache) and every
generated token, kept or not -- the x-axis of an accuracy-vs-compute plot.

The selection rules are plain functions over lists (``majority_vote``, ``weighted_vote``, ``best_index``) with
one deterministic tie rule everywhere: the candidate sampled first wins.
"""

from __future__ import annotations

import dataclasses
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lmforge.engine.complete import BLOCK_SIZE
from lmforge.engine.engine import CPU_KV_CACHE_BYTES, Engine
from lmforge.engine.model_runner import ModelRunner
from lmforge.engine.sequence import SamplingParams
from lmforge.errors import LmforgeError
from lmforge.models.model import Transformer
from lmforge.models.reward import RewardModel

Extractor = Callable[[str], "str | None"]  # completion text -> answer, None when there is none
Verifier = Callable[[str, str], float]  # (prompt text, completion text) -> score, higher is better
STRATEGIES = ("greedy", "majority", "best-of-n", "weighted-majority", "beam")  # run_strategy's names
NEEDS_SCORER = ("best-of-n", "weighted-majority", "beam")


# ---- answers -------------------------------------------------------------------------------------------
def answer_extractor(spec: str | re.Pattern[str] | Extractor | None) -> Extractor:
    """``completion text -> answer or None`` (None: unparseable, left out of every vote).

    * None: the whole completion, stripped (empty -> None);
    * a regex (text or compiled): its *last* match in the completion -- reasoning usually states intermediate
      values before the final answer -- group 1 if the pattern has a group, else the whole match, stripped;
    * a callable: used as is; its result is stripped, and an empty string counts as None.
    """
    if spec is None:
        return lambda text: text.strip() or None
    if isinstance(spec, (str, re.Pattern)):
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise LmforgeError(f"answer regex {spec!r} does not compile: {e}") from None

        def by_regex(text: str) -> str | None:
            last = None
            for last in pattern.finditer(text):
                pass
            if last is None:
                return None
            found = last.group(1) if pattern.groups else last.group(0)
            return found.strip() if found and found.strip() else None

        return by_regex
    if callable(spec):
        def by_function(text: str) -> str | None:
            answer = spec(text)
            if answer is None:
                return None
            answer = str(answer).strip()
            return answer or None

        return by_function
    raise LmforgeError(f"extract must be None, a regex or a function text -> answer, got {type(spec).__name__}")


# ---- selection rules (pure) ------------------------------------------------------------------------------
def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int]:
    """The most frequent answer and its count; None answers do not vote. Tie: the answer whose first sample
    comes earliest wins (deterministic for seeded sampling, and independent of how answers sort).
    ``(None, 0)`` when no answer could be extracted."""
    counts: dict[str, int] = {}  # insertion order = order of first appearance
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return None, 0
    # max() returns the first maximal item, and the dict iterates in first-appearance order.
    best = max(counts, key=counts.__getitem__)
    return best, counts[best]


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> tuple[str | None, float]:
    """The answer with the largest total weight, and that total; None answers do not vote. Tie: the answer
    sampled first. Weights must be finite (give a sample you cannot score weight 0 or answer None)."""
    if len(answers) != len(weights):
        raise LmforgeError(f"{len(answers)} answers but {len(weights)} weights")
    totals: dict[str, float] = {}
    for a, w in zip(answers, weights):
        if not math.isfinite(w):
            raise LmforgeError(f"vote weights must be finite, got {w}")
        if a is not None:
            totals[a] = totals.get(a, 0.0) + float(w)
    if not totals:
        return None, 0.0
    best = max(totals, key=totals.__getitem__)
    return best, totals[best]


def best_index(scores: Sequence[float | None]) -> int | None:
    """Index of the highest score; ties go to the first. None and NaN mean "could not be scored" and are
    skipped; None when nothing was scored."""
    best = None
    for i, s in enumerate(scores):
        if s is None or math.isnan(s):
            continue
        if best is None or s > scores[best]:  # strict >: the first of equal scores stays
            best = i
    return best


# ---- scorers ---------------------------------------------------------------------------------------------
class Scorer(ABC):
    """Rates completions of one prompt; higher is better. Strategies call ``score_tokens`` (the ids as
    sampled and their text); a subclass that reads text only implements ``score``."""

    @abstractmethod
    def score(self, prompt: str, completions: Sequence[str]) -> list[float]:
        """One score per completion of ``prompt`` (text)."""

    def score_tokens(self, prompt_ids: Sequence[int], prompt: str,
                     completions: Sequence[tuple[Sequence[int], str]]) -> list[float]:
        """One score per ``(token_ids, text)`` completion of the prompt given both as ids and as text."""
        return self.score(prompt, [text for _, text in completions])


class VerifierScorer(Scorer):
    """A verifier ``fn(prompt_text, completion_text) -> float`` (e.g. 1.0 for a correct answer, else 0.0)."""

    def __init__(self, fn: Verifier) -> None:
        if not callable(fn):
            raise LmforgeError(f"a verifier must be a function (prompt, completion) -> float, got {type(fn).__name__}")
        self.fn = fn

    def score(self, prompt: str, completions: Sequence[str]) -> list[float]:
        return [float(self.fn(prompt, c)) for c in completions]


class RewardScorer(Scorer):
    """A Bradley-Terry reward model (``lmforge rm``) scoring prompt + completion, ``batch_size`` rows a pass.

    The input is the prompt's ids followed by the completion's ids without its final stop token: what the
    reward model saw in training (``encode_pair`` encodes prompt (special tokens) + completion + EOS and feeds
    all but the EOS), so the reward is read at the completion's last token."""

    def __init__(self, reward_model: RewardModel, tokenizer: Any, batch_size: int = 16) -> None:
        if not isinstance(reward_model, RewardModel):
            raise LmforgeError(f"RewardScorer needs a lmforge RewardModel (load_reward_model), "
                               f"got {type(reward_model).__name__}")
        if batch_size < 1:
            raise LmforgeError(f"batch_size must be >= 1, got {batch_size}")
        self.reward_model, self.tokenizer, self.batch_size = reward_model, tokenizer, batch_size
        self._stop_ids = set(getattr(tokenizer, "eos_ids", ()) or ())

    def score(self, prompt: str, completions: Sequence[str]) -> list[float]:
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        return self.score_ids(prompt_ids, [self.tokenizer.encode(c, add_special_tokens=False) for c in completions])

    def score_tokens(self, prompt_ids: Sequence[int], prompt: str,
                     completions: Sequence[tuple[Sequence[int], str]]) -> list[float]:
        rows = []
        for ids, _ in completions:
            ids = list(ids)
            if ids and ids[-1] in self._stop_ids:
                ids = ids[:-1]
            rows.append(ids)
        return self.score_ids(prompt_ids, rows)

    def score_ids(self, prompt_ids: Sequence[int], completion_ids: Sequence[Sequence[int]]) -> list[float]:
        """Rewards of ``prompt_ids + completion_ids[i]``, right-padded batches (read at the last real token)."""
        cfg = self.reward_model.config
        rows = [list(prompt_ids) + list(c) for c in completion_ids]
        for r in rows:
            if not r:
                raise LmforgeError("cannot score an empty prompt + completion")
            if len(r) > cfg.max_position_embeddings:
                raise LmforgeError(f"prompt + completion has {len(r)} tokens; the reward model takes at most "
                                   f"{cfg.max_position_embeddings}")
            if max(r) >= cfg.vocab_size:
                raise LmforgeError(f"token id {max(r)} is outside the reward model's vocabulary ({cfg.vocab_size}); "
                                   "the reward model and the policy need the same tokenizer")
        pad = getattr(self.tokenizer, "pad_id_or_eos", 0)  # any valid id: padding is masked out
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, :len(r)] = 1
            scores += self.reward_model.score(ids, mask).tolist()
        return scores


def as_scorer(scorer: Scorer | Verifier | None, strategy: str) -> Scorer:
    """A ``Scorer`` from a scorer or a verifier function; None is the error of a strategy run without one."""
    if scorer is None:
        raise LmforgeError(f"strategy {strategy!r} needs a scorer: a verifier function (prompt, completion) -> "
                           "float or RewardScorer(reward_model, tokenizer)")
    if isinstance(scorer, Scorer):
        return scorer
    if isinstance(scorer, RewardModel):
        raise LmforgeError("wrap the reward model as RewardScorer(reward_model, tokenizer): scoring needs its tokenizer")
    return VerifierScorer(scorer)


def parse_verifier(spec: str, extract: Extractor) -> Verifier:
    """A verifier from its command-line form (scores 1.0 or 0.0):

    * ``regex-match:PATTERN`` -- the completion contains a match of PATTERN;
    * ``answer:VALUE`` -- the extracted answer (``extract``) equals VALUE.
    """
    kind, sep, arg = spec.partition(":")
    if sep and kind == "regex-match":
        try:
            pattern = re.compile(arg)
        except re.error as e:
            raise LmforgeError(f"verifier regex {arg!r} does not compile: {e}") from None
        return lambda prompt, completion: float(pattern.search(completion) is not None)
    if sep and kind == "answer":
        want = arg.strip()
        return lambda prompt, completion: float(extract(completion) == want)
    raise LmforgeError(f"unknown verifier {spec!r}: use regex-match:PATTERN or answer:VALUE")


# ---- results -----------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One sampled completion (for beam search: a whole partial or finished solution)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (end of sequence) | "length"; beam search also "step" (delimiter reached)
    answer: str | None = None
    score: float | None = None


@dataclass
class TokenUsage:
    """The engine's counters over one strategy run."""

    prompt_tokens: int  # prompt tokens of every request: n samples of a P-token prompt ask for n * P
    prompt_tokens_computed: int  # of those, the ones the model computed (the rest came from the prefix cache)
    generated_tokens: int  # every sampled token, selected or not
    computed_tokens: int  # every token the model ran on: prompt and decode


@dataclass
class BeamStep:
    """One step of ``step_beam_search``: the expansions it sampled and the beams it kept."""

    candidates: list[Candidate]  # new partial solutions (deduplicated), scored
    parents: list[int]  # candidates[i] extends the previous step's kept[parents[i]]
    kept: list[Candidate]  # the beams after selection (finished ones from earlier steps included)


@dataclass
class StrategyResult:
    strategy: str
    best: Candidate  # the chosen completion
    candidates: list[Candidate]  # every sample (beam search: the final beams), in sampling order
    usage: TokenUsage
    answer: str | None = None  # the voted answer (majority / weighted), else the best candidate's
    votes: float | None = None  # majority: how many samples gave ``answer``; weighted: its total weight
    steps: list[BeamStep] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.best.text


# ---- running the engine ---------------------------------------------------------------------------------
class _Run:
    """One engine for one strategy run, and the counters it started from."""

    def __init__(self, engine: Engine, tokenizer: Any) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self._start = dict(engine.stats)

    def usage(self) -> TokenUsage:
        now, start = self.engine.stats, self._start
        return TokenUsage(*(now[k] - start[k] for k in ("prompt_tokens", "prompt_computed_tokens",
                                                        "generated_tokens", "computed_tokens")))

    def sample(self, requests: list[tuple[list[int], SamplingParams]]) -> list[list[Candidate]]:
        outs = self.engine.generate([ids for ids, _ in requests], [p for _, p in requests])
        return [[Candidate(o.text, list(o.token_ids), o.finish_reason) for o in out.outputs] for out in outs]


@contextmanager
def _run(model: Transformer | Engine, tokenizer: Any, num_seqs: int, seq_len: int) -> Iterator[_Run]:
    """An engine over ``model`` with room for ``num_seqs`` sequences of ``seq_len`` tokens at once (an Engine
    passed in is used as is; it should be idle, or its other requests count in the usage)."""
    if isinstance(model, Engine):
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if tokenizer is None:
            raise LmforgeError("test-time strategies compare answers as text: pass a tokenizer")
        yield _Run(model, tokenizer)
        return
    if not isinstance(model, Transformer):
        raise LmforgeError(f"model must be a lmforge Transformer or Engine, got {type(model).__name__}")
    if tokenizer is None:
        raise LmforgeError("test-time strategies compare answers as text: pass a tokenizer")
    seq_len = min(seq_len, model.config.max_position_embeddings)
    per_block = ModelRunner.bytes_per_block(model, BLOCK_SIZE)
    # As complete() does: no larger a pool than the run can use at once, capped by the CPU default budget.
    num_blocks = max(1, min(num_seqs * -(-seq_len // BLOCK_SIZE), CPU_KV_CACHE_BYTES // per_block))
    was_training = model.training
    try:
        engine = Engine(model, tokenizer, block_size=BLOCK_SIZE, num_blocks=num_blocks, max_num_seqs=max(num_seqs, 1),
                        max_num_batched_tokens=2048)
        yield _Run(engine, tokenizer)
    finally:
        model.train(was_training)


def _prompt(prompt: str | Sequence[int], tokenizer: Any) -> tuple[list[int], str]:
    """The prompt as ids and as text (the text is what verifiers read)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise LmforgeError("test-time strategies compare answers as text: pass a tokenizer")
        ids = tokenizer.encode(prompt)
        text = prompt
    else:
        ids = [int(t) for t in prompt]
        text = tokenizer.decode(ids) if tokenizer is not None else ""
    if not ids:
        raise LmforgeError("the prompt is empty")
    return ids, text


def _engine_tokenizer(model: Transformer | Engine, tokenizer: Any) -> Any:
    return tokenizer if tokenizer is not None or not isinstance(model, Engine) else model.tokenizer


def _samples(model: Transformer | Engine, prompt: str | Sequence[int], n: int, params: SamplingParams,
             tokenizer: Any) -> tuple[list[int], str, list[Candidate], TokenUsage]:
    """n samples of one prompt in one request: the engine computes the prompt once and the other samples fork
    from the first (its KV blocks shared)."""
    if not isinstance(n, int) or n < 1:
        raise LmforgeError(f"n must be a positive integer, got {n!r}")
    tokenizer = _engine_tokenizer(model, tokenizer)
    prompt_ids, prompt_text = _prompt(prompt, tokenizer)
    params = dataclasses.replace(params, n=n).validate()
    with _run(model, tokenizer, n, len(prompt_ids) + params.max_tokens) as run:
        candidates = run.sample([(prompt_ids, params)])[0]
        usage = run.usage()
    return prompt_ids, prompt_text, candidates, usage


# ---- strategies ---------------------------------------------------------------------------------------------
def self_consistency(model: Transformer | Engine, prompt: str | Sequence[int], n: int, params: SamplingParams,
                     tokenizer: Any = None, extract: str | re.Pattern[str] | Extractor | None = None) -> StrategyResult:
    """Majority vote over the answers of n samples (``extract``: see ``answer_extractor``). ``best`` is the
    first sample giving the winning answer; with no parseable answer at all, the first sample."""
    candidates, usage = _answered(model, prompt, n, params, tokenizer, extract)
    answer, votes = majority_vote([c.answer for c in candidates])
    best = next((c for c in candidates if answer is not None and c.answer == answer), candidates[0])
    return StrategyResult("majority", best, candidates, usage, answer=answer, votes=votes)


def best_of_n(model: Transformer | Engine, prompt: str | Sequence[int], n: int, params: SamplingParams,
              scorer: Scorer | Verifier | None, tokenizer: Any = None,
              extract: str | re.Pattern[str] | Extractor | None = None) -> StrategyResult:
    """The highest-scoring of n samples (ties: the first sampled; if no score is a number, the first sample).
    ``scorer``: a verifier ``fn(prompt_text, completion_text) -> float`` or a ``RewardScorer``."""
    candidates, usage = _answered(model, prompt, n, params, tokenizer, extract, as_scorer(scorer, "best-of-n"))
    i = best_index([c.score for c in candidates])
    best = candidates[0 if i is None else i]
    return StrategyResult("best-of-n", best, candidates, usage, answer=best.answer)


def weighted_majority(model: Transformer | Engine, prompt: str | Sequence[int], n: int, params: SamplingParams,
                      scorer: Scorer | Verifier | None, tokenizer: Any = None,
                      extract: str | re.Pattern[str] | Extractor | None = None,
                      weighting: Literal["exp", "raw"] = "exp") -> StrategyResult:
    """Answers of n samples vote with weights from their scores: ``exp(score - max score)`` by default (a
    Bradley-Terry reward is a log-odds, so exp makes any reward a positive weight; the shift changes no
    vote), or ``raw`` scores, which must then be >= 0 (e.g. verifier probabilities). A sample without a
    finite score weighs 0. ``best``: the highest-scoring sample with the winning answer."""
    if weighting not in ("exp", "raw"):
        raise LmforgeError(f"weighting must be 'exp' or 'raw', got {weighting!r}")
    candidates, usage = _answered(model, prompt, n, params, tokenizer, extract,
                                  as_scorer(scorer, "weighted-majority"))
    scores = [c.score if c.score is not None and math.isfinite(c.score) else None for c in candidates]
    if weighting == "exp":
        top = max((s for s in scores if s is not None), default=0.0)
        weights = [0.0 if s is None else math.exp(s - top) for s in scores]
    else:
        negative = [s for s in scores if s is not None and s < 0]
        if negative:
            raise LmforgeError(f"weighting='raw' needs scores >= 0, got {negative[0]}; use weighting='exp'")
        weights = [0.0 if s is None else s for s in scores]
    answer, total = weighted_vote([c.answer for c in candidates], weights)
    same = [c for c in candidates if answer is not None and c.answer == answer]
    pool = same or candidates
    i = best_index([c.score for c in pool])
    best = pool[0 if i is None else i]
    return StrategyResult("weighted-majority", best, candidates, usage, answer=answer, votes=total)


def _answered(model: Transformer | Engine, prompt: str | Sequence[int], n: int, params: SamplingParams,
              tokenizer: Any, extract: str | re.Pattern[str] | Extractor | None,
              scorer: Scorer | None = None) -> tuple[list[Candidate], TokenUsage]:
    """n samples of the prompt, each scored (with a scorer) and with its extracted answer."""
    extractor = answer_extractor(extract)
    prompt_ids, prompt_text, candidates, usage = _samples(model, prompt, n, params, tokenizer)
    if scorer is not None:
        _score(scorer, prompt_ids, prompt_text, candidates)
    for c in candidates:
        c.answer = extractor(c.text)
    return candidates, usage


def _score(scorer: Scorer, prompt_ids: list[int], prompt_text: str, candidates: list[Candidate]) -> None:
    scores = scorer.score_tokens(prompt_ids, prompt_text, [(c.token_ids, c.text) for c in candidates])
    if len(scores) != len(candidates):
        raise LmforgeError(f"the scorer returned {len(scores)} scores for {len(candidates)} completions")
    for c, s in zip(candidates, scores):
        c.score = float(s)


def _rank_key(c: Candidate) -> float:
    return c.score if c.score is not None and not math.isnan(c.score) else -math.inf


def step_beam_search(model: Transformer | Engine, prompt: str | Sequence[int], scorer: Scorer | Verifier | None,
                     beam_width: int = 4, expansions_per_beam: int = 4, step_delimiter: str = "\n",
                     max_steps: int = 8, max_step_tokens: int = 64, params: SamplingParams | None = None,
                     tokenizer: Any = None,
                     extract: str | re.Pattern[str] | Extractor | None = None) -> StrategyResult:
    """Step-level beam search scored at step boundaries (PRM-style).

    Each step samples ``expansions_per_beam`` continuations of every unfinished beam, each up to and
    including the token that completes ``step_delimiter`` (the engine's stop string) or ``max_step_tokens``.
    A step is kept as sampled -- token ids, so the text may run a few characters past the delimiter when one
    token holds both -- because re-tokenizing would change what the model conditioned on. The scorer rates
    every new partial solution (prompt + all its steps); the ``beam_width`` best of them plus the finished
    beams kept so far survive (a beam finishes at end of sequence or the context length). Identical partial
    solutions are merged (the first sampled stays): they would score the same and crowd out the others.
    Ranking ties go to the earlier entry (kept finished beams, then candidates in sampling order); an
    unscorable (None/NaN) solution ranks last. After ``max_steps`` steps, or when every kept beam has
    finished, ``best`` is the top-ranked kept beam.

    ``params``: temperature, top-p, seed, ...; ``n``, ``max_tokens`` and ``stop`` are set per step (other stop
    strings are not allowed). Seeded, the i-th sample drawn in the run uses ``seed + i``.
    """
    scorer = as_scorer(scorer, "beam")
    for name, value in (("beam_width", beam_width), ("expansions_per_beam", expansions_per_beam),
                        ("max_steps", max_steps), ("max_step_tokens", max_step_tokens)):
        if not isinstance(value, int) or value < 1:
            raise LmforgeError(f"{name} must be a positive integer, got {value!r}")
    if not step_delimiter:
        raise LmforgeError("step_delimiter must be a non-empty string")
    params = params if params is not None else SamplingParams(temperature=1.0)
    if params.stop:
        raise LmforgeError(f"beam search ends steps at step_delimiter; params.stop {params.stop!r} is not supported")
    extractor = answer_extractor(extract)
    tokenizer = _engine_tokenizer(model, tokenizer)
    prompt_ids, prompt_text = _prompt(prompt, tokenizer)
    params.validate()
    width = beam_width * expansions_per_beam
    steps: list[BeamStep] = []
    with _run(model, tokenizer, width, len(prompt_ids) + max_steps * max_step_tokens) as run:
        engine = run.engine
        limit = engine.max_model_len
        end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else engine.eos_ids)
        beams = [Candidate("", [], None)]  # the empty partial solution
        drawn = 0
        for _ in range(max_steps):
            active = [j for j, b in enumerate(beams) if b.finish_reason != "stop"]
            if not active:
                break
            requests = []
            for j in active:
                room = limit - len(prompt_ids) - len(beams[j].token_ids)
                seed = None if params.seed is None else params.seed + drawn
                drawn += expansions_per_beam
                requests.append((prompt_ids + beams[j].token_ids, dataclasses.replace(
                    params, n=expansions_per_beam, max_tokens=min(max_step_tokens, room), stop=[step_delimiter],
                    seed=seed)))
            candidates: list[Candidate] = []
            parents: list[int] = []
            seen = {tuple(b.token_ids) for b in beams if b.finish_reason == "stop"}
            for j, samples in zip(active, run.sample(requests)):
                for s in samples:
                    ids = beams[j].token_ids + s.token_ids
                    if tuple(ids) in seen:
                        continue
                    seen.add(tuple(ids))
                    ended = s.finish_reason == "stop" and bool(s.token_ids) and s.token_ids[-1] in end_ids
                    full = len(prompt_ids) + len(ids) >= limit  # the context is full: no further step
                    reason = "stop" if ended or full else "step" if s.finish_reason == "stop" else "length"
                    candidates.append(Candidate(tokenizer.decode(ids), ids, reason))
                    parents.append(j)
            if candidates:
                _score(scorer, prompt_ids, prompt_text, candidates)
            # Finished beams stay in the running (ranked first among equals: they were kept before).
            pool = [b for b in beams if b.finish_reason == "stop"] + candidates
            order = sorted(range(len(pool)), key=lambda i: -_rank_key(pool[i]))  # stable: ties keep pool order
            beams = [pool[i] for i in order[:beam_width]]
            steps.append(BeamStep(candidates, parents, list(beams)))
        usage = run.usage()
    for b in beams:
        b.answer = extractor(b.text)
    i = best_index([b.score for b in beams])
    best = beams[0 if i is None else i]
    return StrategyResult("beam", best, beams, usage, answer=best.answer, steps=steps)


def run_strategy(strategy: str, model: Transformer | Engine, prompt: str | Sequence[int], params: SamplingParams,
                 tokenizer: Any = None, n: int = 8, scorer: Scorer | Verifier | None = None,
                 extract: str | re.Pattern[str] | Extractor | None = None, beam_width: int = 4,
                 step_delimiter: str = "\n", max_steps: int = 8) -> StrategyResult:
    """Dispatch by name (``STRATEGIES``), as the command line does. ``greedy`` is one temperature-0 sample;
    for ``beam``, ``n`` is the expansions per beam and ``params.max_tokens`` the longest step."""
    if strategy == "greedy":
        _, _, candidates, usage = _samples(model, prompt, 1, dataclasses.replace(params, temperature=0.0), tokenizer)
        best = candidates[0]
        best.answer = answer_extractor(extract)(best.text)
        return StrategyResult("greedy", best, candidates, usage, answer=best.answer)
    if strategy == "majority":
        return self_consistency(model, prompt, n, params, tokenizer, extract)
    if strategy == "best-of-n":
        return best_of_n(model, prompt, n, params, scorer, tokenizer, extract)
    if strategy == "weighted-majority":
        return weighted_majority(model, prompt, n, params, scorer, tokenizer, extract)
    if strategy == "beam":
        return step_beam_search(model, prompt, scorer, beam_width=beam_width, expansions_per_beam=n,
                                step_delimiter=step_delimiter, max_steps=max_steps, max_step_tokens=params.max_tokens,
                                params=params, tokenizer=tokenizer, extract=extract)
    raise LmforgeError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


__all__ = ["STRATEGIES", "BeamStep", "Candidate", "RewardScorer", "Scorer", "StrategyResult", "TokenUsage",
           "VerifierScorer", "answer_extractor", "as_scorer", "best_index", "best_of_n", "majority_vote",
           "parse_verifier", "run_strategy", "self_consistency", "step_beam_search", "weighted_majority",
           "weighted_vote"]
