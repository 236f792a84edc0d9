"""Scoring primitives, defined as lm-evaluation-harness defines them.

* ``loglikelihood``: for a (context, continuation) pair, encode ``context + continuation`` as a whole and
  take the tokens after ``encode(context)`` as the continuation (trailing spaces of the context move to
  the continuation first). The score is the sum of log p(continuation tokens), and ``is_greedy`` says
  whether every continuation token is the argmax. Inputs longer than ``max_length + 1`` tokens lose
  tokens on the left. An empty context conditions on the prefix token (BOS, else EOS).
* ``acc``/``acc_norm``: argmax of the choice log-likelihoods, raw or divided by the number of
  *characters* of the choice (without the target delimiter).
* ``loglikelihood_rolling``: a document's total log-likelihood in disjoint windows of ``max_length``
  tokens (the first conditioned on the prefix token; the last one re-reads earlier tokens as context so
  it is full length); word/byte perplexity and bits per byte aggregate sums over documents.
* generative exact match: the extracted answer equals the reference string.
* standard errors: seeded bootstrap over documents of the task's aggregate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError

Pair = tuple[list[int], list[int]]


# ---- tokenisation ------------------------------------------------------------------------------
def tok_encode(tokenizer: Any, text: str) -> list[int]:
    """The tokenizer's default special tokens (as HF ``encode``), unless the text already starts with BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def prefix_token_id(tokenizer: Any) -> int:
    """What an empty context conditions on: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    for tid in (getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)):
        if tid is not None:
            return tid
    raise LmforgeError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Pair:
    """(context ids, continuation ids) split from the encoding of the joined text."""
    if not context:
        return [prefix_token_id(tokenizer)], tok_encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "Answer: " + "42" tokenises as "Answer:" + " 42" in BPE vocabularies
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok_encode(tokenizer, context + continuation)
    ctx = tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def model_max_length(model: Any) -> int:
    return int(model.config.max_position_embeddings)


# ---- log-likelihood ----------------------------------------------------------------------------
@torch.inference_mode()
def loglikelihood_tokens(model: Any, requests: Sequence[Pair], batch_size: int = 16,
                         max_length: int | None = None) -> list[tuple[float, bool]]:
    """(sum log p(continuation), is_greedy) per (context ids, continuation ids), batched, right-padded."""
    max_length = max_length or model_max_length(model)
    rows = []
    for ctx, cont in requests:
        if not cont:
            raise LmforgeError("a continuation encodes to no tokens; nothing to score")
        if len(cont) > max_length:
            raise LmforgeError(f"a continuation of {len(cont)} tokens exceeds max_length {max_length}")
        inp = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
        rows.append((inp, list(cont)))
    # Longest first: each batch pads to similar lengths, and an out-of-memory shows up on the first batch.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    device = model.device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = len(rows[idx[0]][0])
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            inp = rows[i][0]
            ids[r, :len(inp)] = torch.tensor(inp)
            mask[r, :len(inp)] = 1
        logits = model(ids.to(device), attention_mask=mask.to(device))
        for r, i in enumerate(idx):
            inp, cont = rows[i]
            n = len(cont)
            # position t predicts token t+1: the last n logits of the real input score the continuation
            logp = F.log_softmax(logits[r, len(inp) - n:len(inp)].float(), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            score = logp.gather(-1, target[:, None]).sum().item()
            greedy = bool((logp.argmax(-1) == target).all())
            results[i] = (score, greedy)
    return results  # type: ignore[return-value]


def loglikelihood(model: Any, tokenizer: Any, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                  max_length: int | None = None) -> list[tuple[float, bool]]:
    """Score text (context, continuation) pairs; see the module docstring for the definition."""
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    return loglikelihood_tokens(model, pairs, batch_size, max_length)


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[Pair]:
    """(context, continuation) windows that score every token exactly once (lm-eval, context_len=1)."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        k = min(len(tokens) - done, max_length)
        end = done + k
        # a full-length input ending at the last predicted token; the part before the predictions is context
        windows.append((tokens[end - max_length - 1:end - k], tokens[end - k:end]))
        done = end
    return windows


@torch.inference_mode()
def loglikelihood_images(model: Any, processor: Any, requests: Sequence[Pair], images: Sequence[Any],
                         batch_size: int = 16, max_length: int | None = None) -> list[tuple[float, bool]]:
    """``loglikelihood_tokens`` for a vision-language model: each (context ids, continuation ids) pair's context
    holds one image placeholder for its image in ``images``; the processor expands it and makes the image
    tensors, the rows are left-padded, so every continuation ends its row. Nothing is truncated: a request
    longer than ``max_length`` (after the image's expansion) is an error."""
    max_length = max_length or model_max_length(model)
    rows = []
    for ctx, cont in requests:
        if not cont:
            raise LmforgeError("a continuation encodes to no tokens; nothing to score")
        inp = (list(ctx) + list(cont))[:-1]
        width = len(processor.expand(inp))
        if width > max_length:
            raise LmforgeError(f"a request of {width} tokens (its image expanded) exceeds max_length {max_length}")
        rows.append((inp, list(cont)))
    results: list[tuple[float, bool]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = processor.encode_ids([inp for inp, _ in chunk], list(images[start:start + batch_size]))
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = model(**batch)
        width = logits.shape[1]
        for r, (_, cont) in enumerate(chunk):
            n = len(cont)
            logp = F.log_softmax(logits[r, width - n:].float(), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            results.append((logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
    return results


def generate_with_images(model: Any, processor: Any, prompts: Sequence[str], images: Sequence[Any],
                         max_new_tokens: int = 32, stop: Sequence[str] = (), batch_size: int = 16) -> list[str]:
    """Greedy completions of ``prompts`` (each holding one image placeholder) with their images, through
    ``lmforge.models.generate`` (the one path for both families: the engine runs LLaVA-style images only), cut at
    EOS and at the first stop string."""
    from lmforge.models.generate import default_eos_ids, generate

    tokenizer = processor.tokenizer
    eos = list(dict.fromkeys([*tokenizer.eos_ids, *default_eos_ids(model)]))
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [tok_encode(tokenizer, p) for p in prompts[start:start + batch_size]]
        batch = processor.encode_ids(rows, list(images[start:start + batch_size]))
        width = batch["input_ids"].shape[1]
        if width + max_new_tokens > model_max_length(model):
            raise LmforgeError(f"a prompt of {width} tokens (its image expanded) + max_new_tokens {max_new_tokens} "
                               f"exceeds the model's context ({model_max_length(model)} tokens)")
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        ids = batch.pop("input_ids")
        tokens = generate(model, ids, max_new_tokens=max_new_tokens, eos_ids=eos, **batch)  # new tokens only
        for row in tokens.tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            text = tokenizer.decode(row[:cut], skip_special_tokens=True)
            for s in stop:
                if s and s in text:
                    text = text[:text.index(s)]
            out.append(text)
    return out


def loglikelihood_rolling(model: Any, tokenizer: Any, docs: Sequence[str], batch_size: int = 16,
                          max_length: int | None = None) -> list[float]:
    """Total log-likelihood of each document (natural log)."""
    max_length = max_length or model_max_length(model)
    prefix = prefix_token_id(tokenizer)
    windows, owner = [], []
    for d, text in enumerate(docs):
        for w in rolling_windows(tok_encode(tokenizer, text), prefix, max_length):
            windows.append(w)
            owner.append(d)
    scores = loglikelihood_tokens(model, windows, batch_size, max_length)
    totals = [0.0] * len(docs)
    for d, (s, _) in zip(owner, scores):
        totals[d] += s
    return totals


# ---- generation --------------------------------------------------------------------------------
def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 32,
                   stop: Sequence[str] = (), batch_size: int = 16, temperature: float = 0.0,
                   seed: int | None = None) -> list[str]:
    """Completions of ``prompts`` through the engine (``batch_size`` sequences at once), cut at EOS and at the
    first stop string."""
    from lmforge.engine.complete import complete
    from lmforge.engine.sequence import SamplingParams

    limit = model_max_length(model) - max_new_tokens
    if limit < 1:
        raise LmforgeError(f"max_new_tokens {max_new_tokens} leaves no room in the context "
                           f"({model_max_length(model)} tokens)")
    encoded = [tok_encode(tokenizer, p)[-limit:] for p in prompts]  # keep the end of an over-long prompt
    params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, stop=[x for x in stop if x], seed=seed)
    return [samples[0].text for samples in complete(model, encoded, params, tokenizer, max_num_seqs=batch_size)]


# ---- metrics -----------------------------------------------------------------------------------
def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc and acc_norm of one multiple-choice doc (acc_norm divides by the choice's character count)."""
    lls_arr = np.asarray(lls, dtype=np.float64)
    lengths = np.asarray([max(len(c), 1) for c in choices], dtype=np.float64)
    return {"acc": float(np.argmax(lls_arr) == gold), "acc_norm": float(np.argmax(lls_arr / lengths) == gold)}


def exact_match(prediction: str | None, reference: str) -> float:
    return float(prediction is not None and prediction.strip() == str(reference).strip())


def doc_weights(text: str) -> tuple[int, int]:
    """(words, UTF-8 bytes) of a document, the denominators of word and byte perplexity."""
    return len(re.split(r"\s+", text)), len(text.encode("utf-8"))


def perplexity_metrics(lls: Sequence[float], words: Sequence[int], nbytes: Sequence[int]) -> dict[str, float]:
    """Corpus-level word/byte perplexity and bits per byte from per-document sums."""
    total = float(np.sum(lls))
    return {"word_perplexity": math.exp(-total / max(int(np.sum(words)), 1)),
            "byte_perplexity": math.exp(-total / max(int(np.sum(nbytes)), 1)),
            "bits_per_byte": -total / max(int(np.sum(nbytes)), 1) / math.log(2)}


def bootstrap_stderr(items: Sequence[Any] | np.ndarray, aggregate: Callable[[np.ndarray], float] | None = None,
                     iters: int = 1000, seed: int = 1234) -> float:
    """Standard deviation of ``aggregate`` over ``iters`` resamples of the items (with replacement).

    ``items`` is an array whose first axis is documents; ``aggregate`` defaults to the mean. Seeded, so the
    same inputs always give the same number.
    """
    arr = np.asarray(items, dtype=np.float64)
    n = arr.shape[0]
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(iters, n))
    if aggregate is None:  # the common case, vectorised
        return float(arr[idx].mean(axis=1).std(ddof=1))
    stats = np.array([aggregate(arr[i]) for i in idx])
    return float(stats.std(ddof=1))
