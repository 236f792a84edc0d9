"""Steering vectors from contrast pairs: contrastive activation addition and PCA of the differences.

    pos = ["I love this!", "What a wonderful day."]        # paired: pos[i] and neg[i] differ in the concept
    neg = ["I hate this!", "What a terrible day."]
    vec = contrastive_vector(model, tok, pos, neg, layers=[3])   # CAA: mean of (pos_i - neg_i) at layer 3
    out = generate(model, ids, steering=Steering(vec, scale=4.0))  # or model(ids, hooks=steering_hooks(vec, 4.0))
    vec.save("happy.gguf")                                    # llama.cpp: --control-vector-scaled happy.gguf 4.0

Activations are read at ``blocks.{i}.hook_resid_post`` (the output of block i), which is also where a
vector is added back and where llama.cpp adds ``direction.{i}``, so extraction, ``generate``, the engine
and llama.cpp all mean the same layer by the same index.

``contrastive_vector`` (Rimsky et al. 2024, CAA) keeps the raw mean difference, so scale 1 adds the average
gap between the two sides. ``pca_vector`` (repeng's ``pca_diff``) returns the unit first principal component
of the (centred) paired differences, signed to agree with the mean difference, so its scale is in residual-
stream units.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.models.model import Hook, Transformer
from lmforge.models.steering import HOOK_POINT, Steering, SteeringVector

__all__ = ["SteeringVector", "Steering", "contrastive_vector", "pca_vector", "paired_differences",
           "resid_activations", "steering_hooks", "load_steering_vector"]

Position = Literal["last", "mean"]
Prompt = str | Sequence[int]


def steering_hooks(vector: SteeringVector, scale: float = 1.0) -> dict[str, Hook]:
    """Forward hooks (``model(ids, hooks=...)``) adding ``scale * direction[i]`` at ``blocks.{i}.hook_resid_post``."""
    return Steering(vector, scale).hooks()


def load_steering_vector(path: str) -> SteeringVector:
    """A ``.gguf`` (llama.cpp control vector) or ``.safetensors`` steering vector file."""
    return SteeringVector.load(path)


def _layers(model: Transformer, layers: int | Iterable[int] | None) -> list[int]:
    n = model.config.num_layers
    chosen = list(range(n)) if layers is None else [layers] if isinstance(layers, int) else list(layers)
    if not chosen:
        raise LmforgeError("no layers given to read activations from")
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise LmforgeError(f"layers {bad} do not exist: the model has {n} layers (0..{n - 1})")
    return sorted(set(chosen))


def _token_ids(tokenizer, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise LmforgeError("text prompts need a tokenizer; pass token id lists or a tokenizer")
        ids = tokenizer.encode(prompt)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise LmforgeError(f"prompt {prompt!r} encodes to no tokens")
    return ids


@torch.inference_mode()
def resid_activations(model: Transformer, tokenizer, prompts: Sequence[Prompt], layers: int | Iterable[int] | None,
                      position: Position = "last", batch_size: int = 8) -> dict[int, Tensor]:
    """``{layer: [len(prompts), d]}`` float32 residual-stream activations after each block (``hook_resid_post``):
    at the last token of each prompt (``position="last"``) or averaged over its tokens (``"mean"``)."""
    if position not in ("last", "mean"):
        raise LmforgeError(f"position must be 'last' or 'mean', got {position!r}")
    if batch_size < 1:
        raise LmforgeError(f"batch_size must be >= 1, got {batch_size}")
    chosen = _layers(model, layers)
    ids = [_token_ids(tokenizer, p) for p in prompts]
    limit = model.config.max_position_embeddings
    too_long = [len(x) for x in ids if len(x) > limit]
    if too_long:
        raise LmforgeError(f"a prompt has {max(too_long)} tokens; the model's context length is {limit}")
    out: dict[int, list[Tensor]] = {i: [] for i in chosen}
    device = model.device
    for lo in range(0, len(ids), batch_size):
        batch = ids[lo:lo + batch_size]
        width = max(len(x) for x in batch)
        # Left padding keeps every prompt's last token in the last column ("last" reads x[:, -1]).
        input_ids = torch.tensor([[0] * (width - len(x)) + x for x in batch], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
        seen: dict[int, Tensor] = {}

        def read(x: Tensor, name: str, seen: dict[int, Tensor] = seen) -> None:
            seen[int(name.split(".")[1])] = x.float()  # returns None: the activation is kept, not replaced

        model(input_ids, mask, hooks={HOOK_POINT.format(i): read for i in chosen}, logits_to_keep=1)
        for i in chosen:
            x = seen[i]
            if position == "last":
                out[i].append(x[:, -1].cpu())
            else:
                m = mask[:, :, None].float()
                out[i].append(((x * m).sum(1) / m.sum(1)).cpu())
    return {i: torch.cat(v) for i, v in out.items()}


def paired_differences(model: Transformer, tokenizer, positive: Sequence[Prompt], negative: Sequence[Prompt],
                       layers: int | Iterable[int] | None, position: Position = "last",
                       batch_size: int = 8) -> dict[int, Tensor]:
    """``{layer: [n_pairs, d]}``: activation(positive[i]) - activation(negative[i]) at each layer."""
    if isinstance(positive, str) or isinstance(negative, str):
        raise LmforgeError("positive and negative must be lists of prompts, not single strings")
    if not positive or len(positive) != len(negative):
        raise LmforgeError(f"contrast pairs need equally many positive and negative prompts (at least one); got "
                           f"{len(positive)} positive and {len(negative)} negative")
    acts = resid_activations(model, tokenizer, [*positive, *negative], layers, position, batch_size)
    n = len(positive)
    return {i: a[:n] - a[n:] for i, a in acts.items()}


def _meta(model: Transformer, method: str, position: str, n: int) -> dict:
    return {"model_hint": model.config.model_type,
            "metadata": {"method": method, "position": position, "pairs": str(n), "hook": "hook_resid_post"}}


def contrastive_vector(model: Transformer, tokenizer, positive: Sequence[Prompt], negative: Sequence[Prompt],
                       layers: int | Iterable[int] | None, position: Position = "last",
                       batch_size: int = 8) -> SteeringVector:
    """Contrastive activation addition: per layer, the mean over pairs of activation(pos) - activation(neg)."""
    diffs = paired_differences(model, tokenizer, positive, negative, layers, position, batch_size)
    return SteeringVector({i: d.mean(0) for i, d in diffs.items()}, **_meta(model, "caa", position, len(positive)))


def pca_vector(model: Transformer, tokenizer, positive: Sequence[Prompt], negative: Sequence[Prompt],
               layers: int | Iterable[int] | None, position: Position = "last", center: bool = True,
               batch_size: int = 8) -> SteeringVector:
    """Per layer, the unit first principal component of the paired differences (repeng's ``pca_diff``).

    ``center``: subtract the mean difference first, as repeng's scikit-learn PCA does (the component is then
    the axis along which the pairs' differences vary most); False takes the top singular vector of the raw
    differences. A component's sign is arbitrary, so it is flipped to point along the mean difference.
    """
    diffs = paired_differences(model, tokenizer, positive, negative, layers, position, batch_size)
    directions = {}
    for i, d in diffs.items():
        directions[i] = _first_component(d.double(), center, i).float()
    return SteeringVector(directions, **_meta(model, "pca_center" if center else "pca_raw", position, len(positive)))


def _first_component(diffs: Tensor, center: bool, layer: int) -> Tensor:
    mean = diffs.mean(0)
    x = diffs - mean if center else diffs
    if center and diffs.shape[0] < 2:
        raise LmforgeError("PCA of centred differences needs at least 2 contrast pairs")
    if not bool(x.abs().max() > 0):
        raise LmforgeError(f"the paired differences at layer {layer} do not vary, so they have no principal "
                           "component; use contrastive_vector (their mean) instead")
    component = torch.linalg.svd(x, full_matrices=False).Vh[0]
    if float(component @ mean) < 0:
        component = -component
    return component
