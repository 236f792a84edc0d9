"""run_with_cache / run_with_hooks, the logit lens, direct logit attribution and activation patching."""

from __future__ import annotations

import pytest
import torch

from lmforge import load_model
from lmforge.errors import LmforgeError
from lmforge.interp import (
    activation_patching,
    direct_logit_attribution,
    logit_diff_metric,
    logit_lens,
    metric_value,
    patch_positions,
    run_with_cache,
    run_with_hooks,
)

from ..models.hf_factory import VOCAB, save_hf_model

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

# Dense GQA + RoPE, LayerNorm + learned positions, soft-caps + post-norms, MoE.
FAMILIES = ["llama", "gpt2", "gemma2", "mixtral"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
    return load_model(save_hf_model(request.param, tmp_path_factory.mktemp(request.param))).eval()


def prompt(seed: int, length: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


# ---- run_with_cache / run_with_hooks ------------------------------------------------------------------
def test_run_with_cache_keeps_what_was_asked(model):
    ids = prompt(0)
    with torch.no_grad():
        plain = model(ids)
    logits, cache = run_with_cache(model, ids, names=["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"])
    assert torch.equal(logits, plain)  # reading activations changes nothing
    assert list(cache) == ["blocks.0.attn.hook_z", "blocks.1.hook_resid_post"]  # forward order
    assert cache["resid_post", 1] is cache["blocks.1.hook_resid_post"]  # TransformerLens's short form
    assert cache["z", 0].shape == (1, 9, model.config.heads(0), model.config.head_dim)
    with pytest.raises(KeyError, match="was not cached"):
        cache["resid_pre", 0]
    _, resid = run_with_cache(model, ids, names=lambda name: name.endswith("hook_resid_post"))
    assert resid.stack("resid_post").shape == (model.config.num_layers, 1, 9, model.config.hidden_size)
    _, everything = run_with_cache(model, ids[0].tolist())  # a plain token list works too
    assert list(everything) == model.hook_names()
    assert everything["pattern", 0].shape == (1, model.config.heads(0), 9, 9)


def test_run_with_cache_rejects_an_unknown_name(model):
    with pytest.raises(LmforgeError, match="unknown hook point.*'blocks.0.hook_resid'.*did you mean"):
        run_with_cache(model, prompt(1), names=["blocks.0.hook_resid"])
    _, cache = run_with_cache(model, prompt(1), names=["hook_embed"])
    with pytest.raises(LmforgeError, match="layer 99 is out of range"):
        cache["resid_post", 99]
    with pytest.raises(LmforgeError, match="no hook point 'resid_postt' at layer 0; tried blocks.0.hook_resid_postt"):
        cache["resid_postt", 0]


def test_run_with_hooks_runs_each_points_hooks_in_order(model):
    ids = prompt(2)
    name = "blocks.0.hook_resid_post"
    with torch.no_grad():
        chained = run_with_hooks(model, ids, [(name, lambda x, n: x + 1.0), (name, lambda x, n: x * 2.0)])
        direct = model(ids, hooks={name: lambda x, n: (x + 1.0) * 2.0})
        reversed_order = run_with_hooks(model, ids, [(name, lambda x, n: x * 2.0), (name, lambda x, n: x + 1.0)])
    assert torch.equal(chained, direct)
    assert not torch.allclose(chained, reversed_order)
    with pytest.raises(LmforgeError, match="not callable"):
        run_with_hooks(model, ids, [(name, 3)])
    with pytest.raises(LmforgeError, match=r"\(name, fn\) pairs"):
        run_with_hooks(model, ids, [name])


def test_the_cache_sees_the_edited_activation(model):
    ids, name = prompt(3), "blocks.0.hook_mlp_out"
    _, cache = run_with_cache(model, ids, names=[name], hooks=[(name, lambda x, n: torch.zeros_like(x))])
    assert float(cache[name].abs().max()) == 0.0


# ---- logit lens -----------------------------------------------------------------------------------------
def test_the_last_lens_row_is_the_models_prediction(model):
    ids = prompt(4)
    with torch.no_grad():
        probs = torch.softmax(model(ids)[0].float(), -1)
    target = int(probs[-1].argmax())
    lens = logit_lens(model, ids, target=target, top_k=3)
    n = model.config.num_layers
    assert lens.labels == ["embed", *(f"L{i}" for i in range(n))]
    assert lens.top_ids.shape == (n + 1, 9, 3) and lens.target_probs.shape == (n + 1, 9)
    top = probs.topk(3, -1)
    assert torch.equal(lens.top_ids[-1], top.indices)
    assert torch.allclose(lens.top_probs[-1], top.values, atol=1e-6)
    assert torch.allclose(lens.target_probs[-1], probs[:, target], atol=1e-6)
    assert int(lens.target_ranks[-1, -1]) == 0
    # The earlier rows are genuinely different reads of the stream.
    assert not torch.allclose(lens.target_probs[0], lens.target_probs[-1], atol=1e-3)


def test_the_lens_takes_one_prompt_and_a_real_token(model):
    with pytest.raises(LmforgeError, match="one prompt"):
        logit_lens(model, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(LmforgeError, match="outside the vocabulary"):
        logit_lens(model, prompt(5), target=VOCAB + 3)


# ---- direct logit attribution -------------------------------------------------------------------------------
@pytest.mark.parametrize("wrong", [None, 7])
def test_direct_logit_attribution_adds_up(model, wrong):
    ids, answer = prompt(6), 11
    dla = direct_logit_attribution(model, ids, answer, wrong, position=-2)
    n, h = model.config.num_layers, model.config.heads(0)
    assert dla.layers.shape == (n, 2) and dla.heads.shape == (n, h) and dla.position == 7
    # The residual stream is the sum of the components; through the frozen final norm their logits add up.
    assert abs(dla.embed + float(dla.layers.sum()) + dla.bias - dla.total) < 1e-4
    # Each layer's attention is its heads plus the output bias.
    assert torch.allclose(dla.heads.sum(1) + dla.attn_bias, dla.layers[:, 0], atol=1e-4)
    with torch.no_grad():
        logits = model(ids)[0, 7]
    if model.config.final_logit_softcap is None:  # otherwise total is the pre-cap value, by design
        expected = logits[answer] - (logits[wrong] if wrong is not None else 0.0)
        assert abs(dla.total - float(expected)) < 1e-4


# ---- activation patching -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    clean = prompt(8, length=6)
    corrupted = clean.clone()
    corrupted[0, 2] = (clean[0, 2] + 17) % VOCAB  # one token differs, at position 2
    return clean, corrupted


def test_patching_the_residual_stream_restores_exactly_where_the_prompts_differ(model, pair):
    clean, corrupted = pair
    metric = logit_diff_metric(answer=11, wrong=7)
    clean_value, corrupted_value = metric_value(model, clean, metric), metric_value(model, corrupted, metric)
    assert clean_value != corrupted_value
    result = activation_patching(model, clean, corrupted, metric, what="resid_pre")
    assert result.shape == (model.config.num_layers, 6)
    # Layer 0's input at position 2 is the only place the runs differ: patching it is the clean run, bit for bit;
    # any other position leaves the corrupted run as it was.
    assert result[0, 2] == clean_value
    assert all(result[0, p] == corrupted_value for p in (0, 1, 3, 4, 5))
    # Before position 2 nothing can differ at any layer (causal attention).
    assert torch.all(result[:, :2] == corrupted_value)
    # The whole of layer 0's input, patched at once, is the clean run too.
    with torch.no_grad():
        _, cache = run_with_cache(model, clean, names=["blocks.0.hook_resid_pre"])
        patched = run_with_hooks(model, corrupted, [("blocks.0.hook_resid_pre",
                                                      patch_positions(cache["blocks.0.hook_resid_pre"]))])
    assert float(metric(patched)) == clean_value


def test_patching_attention_heads(model, pair):
    clean, corrupted = pair
    metric = logit_diff_metric(answer=11, wrong=7)
    result = activation_patching(model, clean, corrupted, metric, what="attn_head")
    assert result.shape == (model.config.num_layers, model.config.heads(0))
    corrupted_value = metric_value(model, corrupted, metric)
    # Heads attend to the corrupted token from position 2 on: restoring one of them moves the metric.
    assert torch.isfinite(result).all() and bool((result != corrupted_value).any())
    # Entry (0, 0) is the run with head 0 of layer 0 restored at every position, done by hand here.
    with torch.no_grad():
        _, cache = run_with_cache(model, clean, names=["blocks.0.attn.hook_z"])

        def head0(x, name):
            out = x.clone()
            out[:, :, 0] = cache["blocks.0.attn.hook_z"][:, :, 0]
            return out

        manual = float(metric(run_with_hooks(model, corrupted, [("blocks.0.attn.hook_z", head0)])))
    assert result[0, 0] == manual


def test_patching_needs_aligned_prompts_and_a_known_point(model, pair):
    clean, corrupted = pair
    metric = logit_diff_metric(11, 7)
    with pytest.raises(LmforgeError, match="token-aligned"):
        activation_patching(model, clean, corrupted[:, :5], metric)
    with pytest.raises(LmforgeError, match="cannot patch 'pattern'"):
        activation_patching(model, clean, corrupted, metric, what="pattern")
