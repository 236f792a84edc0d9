"""Hook points on the one forward path, and the ``inputs_embeds`` entry."""

from __future__ import annotations

import pytest
import torch

from lmforge import load_model

from .hf_factory import FAMILIES, left_padded_batch, save_hf_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request, tmp_path_factory):
    return load_model(save_hf_model(request.param, tmp_path_factory.mktemp(request.param))).eval()


def capture(model, ids, mask, **kw):
    acts = {}

    def keep(x, name):
        acts[name] = x.detach().clone()  # returns None: the activation is left as it is

    with torch.no_grad():
        logits = model(ids, mask, hooks={name: keep for name in model.hook_names()}, **kw)
    return logits, acts


def test_hooks_see_the_residual_stream_and_change_nothing(model):
    ids, mask = left_padded_batch(seed=2, length=12)
    with torch.no_grad():
        plain = model(ids, mask)
    logits, acts = capture(model, ids, mask)
    assert torch.equal(logits, plain)
    assert list(acts) == model.hook_names()  # every point, reached in the documented order
    n = model.config.num_layers
    assert len(acts) == 2 + 5 * n
    for i in range(n):
        a = {p: acts[f"blocks.{i}.hook_{p}"] for p in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")}
        assert torch.equal(a["resid_mid"], a["resid_pre"] + a["attn_out"])
        assert torch.equal(a["resid_post"], a["resid_mid"] + a["mlp_out"])
    assert torch.equal(acts["blocks.0.hook_resid_pre"], acts["hook_embed"])
    final = acts["ln_final.hook_normalized"]
    assert torch.equal(final, model.model.norm(acts[f"blocks.{n - 1}.hook_resid_post"]))
    assert torch.allclose(model.unembed(final), plain, atol=1e-6)


def test_a_hook_can_replace_an_activation(model):
    ids, mask = left_padded_batch(seed=3, length=10)
    n = model.config.num_layers
    steer = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids, mask)
        steered = model(ids, mask, hooks={f"blocks.{n - 1}.hook_resid_post": lambda x, name: x + steer})
        _, acts = capture(model, ids, mask)
        expected = model.unembed(model.model.norm(acts[f"blocks.{n - 1}.hook_resid_post"] + steer))
        ablated = model(ids, mask, hooks={"blocks.0.hook_mlp_out": [lambda x, name: None, lambda x, name: 0 * x]})
    assert torch.allclose(steered, expected, atol=1e-5)
    assert not torch.allclose(steered, plain) and not torch.allclose(ablated, plain)


def test_cached_prefill_sees_the_same_activations(model):
    """The static KV cache runs the same path: a cached prefill captures what the cache-free pass does."""
    ids, mask = left_padded_batch(seed=4, length=9)
    _, free = capture(model, ids, mask)
    _, cached = capture(model, ids, mask, cache=model.new_cache(ids.shape[0], 16))
    real = mask.bool()
    for name in free:
        assert torch.allclose(free[name][real], cached[name][real], atol=1e-5), name


def test_inputs_embeds_is_the_same_path(model):
    ids, mask = left_padded_batch(seed=5, length=8)
    embeds = model.model.embed_tokens(ids)
    if model.config.embedding_multiplier != 1.0:  # the caller applies it (as it would to spliced image features)
        embeds = embeds * torch.tensor(model.config.embedding_multiplier, dtype=embeds.dtype)
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=embeds, attention_mask=mask), model(ids, mask))
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=embeds)
