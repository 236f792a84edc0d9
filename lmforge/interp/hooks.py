"""Reading and editing a model's activations by name: ``run_with_cache`` and ``run_with_hooks``.

Both run the model's one forward pass (``Transformer.forward(hooks=...)``) with TransformerLens's hook
names; ``model.hook_names()`` lists them. A hook is ``fn(activation, name)`` returning a replacement or
None (TransformerLens passes a ``HookPoint`` whose ``.name`` is the name; here it is the name itself).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.models.model import Hook, Transformer

# Which activations to keep: all (None), a list of names, or a predicate on the name.
NameFilter = Sequence[str] | Callable[[str], bool] | None
HookList = Sequence[tuple[str, Hook]] | Mapping[str, Hook | Sequence[Hook]]


def resolve_name(model: Transformer, short: str, layer: int | None = None) -> str:
    """A full hook name from TransformerLens's short form: ("resid_pre", 3) -> ``blocks.3.hook_resid_pre``,
    ("pattern", 0) -> ``blocks.0.attn.hook_pattern``, ("post", 1) -> ``blocks.1.mlp.hook_post``, ("ln1", 2) ->
    ``blocks.2.ln1.hook_normalized``, ("embed",) -> ``hook_embed``, ("ln_final",) -> ``ln_final.hook_normalized``.
    A full name is returned as it is."""
    valid = model.hook_names()
    if layer is None and short in valid:
        return short
    if layer is None:
        candidates = [f"hook_{short}", f"{short}.hook_normalized"]
    else:
        if not 0 <= layer < model.config.num_layers:
            raise LmforgeError(f"layer {layer} is out of range: the model has {model.config.num_layers} layers")
        prefix = f"blocks.{layer}."
        candidates = [prefix + p for p in (f"hook_{short}", f"attn.hook_{short}", f"mlp.hook_{short}",
                                           f"{short}.hook_normalized", short)]
    for name in candidates:
        if name in valid:
            return name
    where = "" if layer is None else f" at layer {layer}"
    raise LmforgeError(f"no hook point {short!r}{where}; tried {', '.join(candidates)} (model.hook_names() lists them)")


class ActivationCache(Mapping[str, Tensor]):
    """Detached activations by hook name, as ``run_with_cache`` recorded them.

    ``cache["blocks.3.hook_resid_post"]`` or TransformerLens's ``cache["resid_post", 3]``; ``cache.stack("resid_post")``
    stacks a per-layer point over the layers [L, ...].
    """

    def __init__(self, activations: dict[str, Tensor], model: Transformer) -> None:
        self.activations, self.model = activations, model

    def __getitem__(self, key: str | tuple) -> Tensor:
        name = resolve_name(self.model, *key) if isinstance(key, tuple) else key
        if name not in self.activations:
            if isinstance(key, tuple) or name in self.model.hook_names():
                raise KeyError(f"{name!r} was not cached; pass it in run_with_cache(names=...)")
            raise KeyError(f"{name!r} is not a hook point of this model (model.hook_names() lists them)")
        return self.activations[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.activations)

    def __len__(self) -> int:
        return len(self.activations)

    def stack(self, short: str) -> Tensor:
        """The point ``short`` (e.g. "resid_post") of every layer, stacked: [L, ...] (same shapes needed)."""
        return torch.stack([self[short, layer] for layer in range(self.model.config.num_layers)])

    def to(self, device: torch.device | str) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self.activations.items()}, self.model)


def select_names(model: Transformer, names: NameFilter) -> list[str]:
    """The hook points ``names`` picks, in forward order; unknown names are an ``LmforgeError``."""
    valid = model.hook_names()
    if names is None:
        return valid
    if callable(names):
        return [name for name in valid if names(name)]
    if isinstance(names, str):
        names = [names]
    model.check_hook_names(names)
    wanted = set(names)
    return [name for name in valid if name in wanted]


def as_token_batch(model: Transformer, ids: Tensor | Sequence[int]) -> Tensor:
    """Token ids as a [B, T] long tensor on the model's device ([T] and plain lists become one row)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise LmforgeError(f"token ids must be [T] or [B, T] with T > 0, got shape {tuple(ids.shape)}")
    return ids.to(model.device)


def run_with_cache(model: Transformer, ids: Tensor | Sequence[int], names: NameFilter = None,
                   attention_mask: Tensor | None = None, hooks: HookList | None = None,
                   device: torch.device | str | None = None) -> tuple[Tensor, ActivationCache]:
    """Run ``ids`` ([T] or [B, T]) without gradients; return (logits [B, T, vocab], the cached activations).

    ``names``: which points to keep (all by default, a list, or a predicate such as
    ``lambda n: n.endswith("resid_post")``). Caching ``attn.hook_pattern``/``hook_attn_scores`` makes those
    layers compute attention explicitly (equal to SDPA up to float rounding); everything else is read from the
    unhooked computation, logits bit-identical. ``hooks``: edits applied during the same run (see
    ``run_with_hooks``); the cache then holds the edited activations. ``device``: where cached tensors go
    (e.g. "cpu" to spare GPU memory).
    """
    ids = as_token_batch(model, ids)
    keep = select_names(model, names)
    activations: dict[str, Tensor] = {}

    def record(x: Tensor, name: str) -> None:
        activations[name] = x.detach() if device is None else x.detach().to(device)

    merged = _hook_dict(hooks)
    for name in keep:  # after the caller's edits at the same point, so the cache shows what flowed on
        merged.setdefault(name, []).append(record)
    with torch.no_grad():
        logits = model(ids, attention_mask, hooks=merged or None)
    return logits, ActivationCache(activations, model)


def run_with_hooks(model: Transformer, ids: Tensor | Sequence[int], hooks: HookList,
                   attention_mask: Tensor | None = None, **forward_kwargs) -> Tensor:
    """Logits of ``ids`` with ``hooks`` applied: [(name, fn), ...] (several per name run in order) or
    {name: fn or [fns]}; ``fn(activation, name)`` returns a replacement or None (read only). Gradients flow
    as in a plain forward call; wrap in ``torch.no_grad()`` when none are needed."""
    ids = as_token_batch(model, ids)
    return model(ids, attention_mask, hooks=_hook_dict(hooks) or None, **forward_kwargs)


def _hook_dict(hooks: HookList | None) -> dict[str, list[Hook]]:
    merged: dict[str, list[Hook]] = {}
    if hooks is None:
        return merged
    pairs = hooks.items() if isinstance(hooks, Mapping) else hooks
    for entry in pairs:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
            raise LmforgeError(f"hooks must be (name, fn) pairs or a {{name: fn}} mapping; got {entry!r}")
        name, fns = entry
        for fn in (fns if isinstance(fns, (list, tuple)) else (fns,)):
            if not callable(fn):
                raise LmforgeError(f"the hook at {name!r} is not callable: {fn!r}")
            merged.setdefault(name, []).append(fn)
    return merged


def patch_positions(source: Tensor, positions: Sequence[int] | slice | None = None) -> Hook:
    """A hook that writes ``source``'s values at ``positions`` (dim 1, all when None) into the activation:
    the building block of activation patching (e.g. a clean run's activation into a corrupted run)."""
    index = slice(None) if positions is None else positions

    def patch(x: Tensor, name: str) -> Tensor:
        if x.shape != source.shape:
            raise LmforgeError(f"cannot patch {name}: activation {tuple(x.shape)} vs source {tuple(source.shape)}")
        out = x.clone()
        out[:, index] = source[:, index].to(x.dtype)
        return out

    return patch
