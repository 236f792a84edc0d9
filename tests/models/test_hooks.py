"""Hook points on the one forward path, and the ``inputs_embeds`` entry."""

from __future__ import annotations

import pytest
import torch

from lmforge import load_model
from lmforge.errors import LmforgeError
from lmforge.models.model import EXPLICIT_ATTENTION_POINTS, no_cache_step

from .hf_factory import FAMILIES, left_padded_batch, save_hf_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request, tmp_path_factory):
    return load_model(save_hf_model(request.param, tmp_path_factory.mktemp(request.param))).eval()


def normalized(norm, x):
    """A norm's ``hook_normalized`` value, from the formulas: x standardised, before weight and bias."""
    if isinstance(norm, torch.nn.LayerNorm):
        return torch.nn.functional.layer_norm(x, norm.normalized_shape, eps=norm.eps)
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)


def is_explicit_attention_point(name):
    return name.endswith(tuple(EXPLICIT_ATTENTION_POINTS))


def capture(model, ids, mask, names=None, **kw):
    acts = {}

    def keep(x, name):
        acts[name] = x.detach().clone()  # returns None: the activation is left as it is

    with torch.no_grad():
        logits = model(ids, mask, hooks={name: keep for name in names or model.hook_names()}, **kw)
    return logits, acts


def test_hooks_see_the_residual_stream_and_change_nothing(model):
    ids, mask = left_padded_batch(seed=2, length=12)
    with torch.no_grad():
        plain = model(ids, mask)
    # Every point but the attention scores/pattern reads what the unhooked pass computes: bit-identical logits.
    logits, acts = capture(model, ids, mask, [n for n in model.hook_names() if not is_explicit_attention_point(n)])
    assert torch.equal(logits, plain)
    # Those two switch attention from SDPA to the explicit softmax: the same up to float rounding.
    all_logits, all_acts = capture(model, ids, mask)
    assert torch.allclose(all_logits, plain, atol=1e-5)
    assert list(all_acts) == model.hook_names()  # every point, reached in the documented order
    n, cfg = model.config.num_layers, model.config
    per_layer = [name for name in model.hook_names() if name.startswith("blocks.0.")]
    mlp_points = (["mlp.hook_router_logits", "mlp.hook_expert_choice"] if cfg.num_experts else
                  ["mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"] if cfg.mlp == "gated" else
                  ["mlp.hook_pre", "mlp.hook_post"])
    rotary = ["attn.hook_rot_q", "attn.hook_rot_k"] if cfg.position_embedding == "rope" else []
    assert [name.removeprefix("blocks.0.") for name in per_layer] == [
        "hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", *rotary,
        "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
        "ln2.hook_normalized", *mlp_points, "hook_mlp_out", "hook_resid_post"]
    assert len(model.hook_names()) == n * len(per_layer) + 2 + (cfg.position_embedding == "learned")
    for i in range(n):
        a = {p: acts[f"blocks.{i}.hook_{p}"] for p in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")}
        assert torch.equal(a["resid_mid"], a["resid_pre"] + a["attn_out"])
        assert torch.equal(a["resid_post"], a["resid_mid"] + a["mlp_out"])
        block = model.model.layers[i]
        assert torch.allclose(acts[f"blocks.{i}.ln1.hook_normalized"], normalized(block.attn_norm, a["resid_pre"]),
                              atol=1e-6)
        assert torch.allclose(acts[f"blocks.{i}.ln2.hook_normalized"], normalized(block.mlp_norm, a["resid_mid"]),
                              atol=1e-6)
        attn = block.self_attn
        b, t = ids.shape
        assert acts[f"blocks.{i}.attn.hook_q"].shape == (b, t, attn.n_heads, attn.head_dim)
        assert acts[f"blocks.{i}.attn.hook_k"].shape == (b, t, attn.n_kv, attn.head_dim)
        z = acts[f"blocks.{i}.attn.hook_z"]
        out = attn.o_proj(z.flatten(-2))
        if block.attn_out_norm is not None:
            out = block.attn_out_norm(out)
        assert torch.equal(out, a["attn_out"])
    embed = acts["hook_embed"]
    if cfg.position_embedding == "learned":
        embed = embed + acts["hook_pos_embed"]
    assert torch.equal(acts["blocks.0.hook_resid_pre"], embed)
    final, norm = acts["ln_final.hook_normalized"], model.model.norm
    assert torch.allclose(final, normalized(norm, acts[f"blocks.{n - 1}.hook_resid_post"]), atol=1e-6)
    # The norm's weight (and bias) come after the hook point; through them and the LM head: the logits.
    weight = norm.weight + 1.0 if getattr(norm, "unit_offset", False) else norm.weight
    hidden = final * weight + (norm.bias if getattr(norm, "bias", None) is not None else 0.0)
    assert torch.allclose(model.unembed(hidden.to(plain.dtype)), plain, atol=1e-5)


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
    # A norm's hook_normalized sits before its weight and bias: zeroed there, only the bias reaches the head.
    with torch.no_grad():
        zeroed = model(ids, mask, hooks={"ln_final.hook_normalized": lambda x, name: torch.zeros_like(x)})
        bias = getattr(model.model.norm, "bias", None)
        from_bias = model.unembed(torch.zeros_like(plain[..., :1]).expand(*plain.shape[:2], model.config.hidden_size)
                                  + (bias if bias is not None else 0.0))
    assert torch.allclose(zeroed, from_bias, atol=1e-6)
    assert not torch.allclose(steered, plain) and not torch.allclose(ablated, plain)


def test_cached_prefill_sees_the_same_activations(model):
    """The static KV cache runs the same path: a cached prefill captures what the cache-free pass does."""
    ids, mask = left_padded_batch(seed=4, length=9)
    _, free = capture(model, ids, mask)
    _, cached = capture(model, ids, mask, cache=model.new_cache(ids.shape[0], 16))
    real = mask.bool()
    for name in free:
        if is_explicit_attention_point(name):  # [B, H, Tq, Tk]: the real query rows
            assert torch.allclose(free[name].transpose(1, 2)[real], cached[name].transpose(1, 2)[real], atol=1e-5)
        else:
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


def test_attention_pattern_is_the_softmax_the_outputs_come_from(model):
    """Rows of hook_pattern sum to 1 over allowed keys only (causal, padding, sliding window), and pattern @ v
    gives hook_z as the unhooked (SDPA) pass computed it."""
    ids, mask = left_padded_batch(seed=6, length=12)
    _, sdpa = capture(model, ids, mask, [n for n in model.hook_names() if n.endswith(("hook_v", "hook_z"))])
    _, acts = capture(model, ids, mask, [n for n in model.hook_names() if n.endswith(("hook_pattern", "hook_z"))])
    real = mask.bool()
    t = ids.shape[1]
    q_pos, k_pos = torch.arange(t)[:, None], torch.arange(t)[None, :]
    for i, block in enumerate(model.model.layers):
        attn = block.self_attn
        pattern = acts[f"blocks.{i}.attn.hook_pattern"]  # [B, H, T, T]
        assert pattern.shape == (ids.shape[0], attn.n_heads, t, t)
        allowed = (k_pos <= q_pos)[None] & real[:, None, :]
        if attn.window is not None:
            allowed = allowed & (q_pos - k_pos < attn.window)[None]
        rows = pattern.transpose(1, 2)[real]  # [real queries, H, T]
        assert torch.allclose(rows.sum(-1), torch.ones(()), atol=1e-5)
        outside = pattern.masked_fill(allowed[:, None], 0.0).transpose(1, 2)[real]  # disallowed keys' weights
        assert float(outside.abs().max()) == 0.0
        v = sdpa[f"blocks.{i}.attn.hook_v"].transpose(1, 2).repeat_interleave(attn.n_heads // attn.n_kv, dim=1)
        z = (pattern @ v).transpose(1, 2)  # [B, T, H, D]
        assert torch.allclose(z[real], sdpa[f"blocks.{i}.attn.hook_z"][real], atol=1e-5)
        assert torch.allclose(acts[f"blocks.{i}.attn.hook_z"][real], sdpa[f"blocks.{i}.attn.hook_z"][real], atol=1e-5)


def test_a_replaced_pattern_drives_the_output(model):
    """Uniform attention over the allowed keys, written into hook_pattern, is what hook_z then holds."""
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(7))  # inside every sliding window
    t = ids.shape[1]
    causal = torch.ones(t, t).tril()
    uniform = causal / causal.sum(-1, keepdim=True)
    _, acts = capture(model, ids, None, ["blocks.0.attn.hook_v", "blocks.0.attn.hook_z"])
    seen = {}
    with torch.no_grad():
        model(ids, hooks={"blocks.0.attn.hook_pattern": lambda x, name: uniform.expand_as(x),
                          "blocks.0.attn.hook_z": lambda x, name: seen.setdefault("z", x)})
    attn = model.model.layers[0].self_attn
    v = acts["blocks.0.attn.hook_v"].repeat_interleave(attn.n_heads // attn.n_kv, dim=2)  # [1, T, H, D]
    expected = torch.einsum("qk,bkhd->bqhd", uniform, v)
    assert torch.allclose(seen["z"], expected, atol=1e-5)
    assert not torch.allclose(seen["z"], acts["blocks.0.attn.hook_z"], atol=1e-3)


def test_router_hooks_read_and_reroute_experts(model):
    cfg = model.config
    if not cfg.num_experts:
        pytest.skip("dense model: no router")
    ids, mask = left_padded_batch(seed=8, length=10)
    names = ["blocks.0.mlp.hook_router_logits", "blocks.0.mlp.hook_expert_choice"]
    with torch.no_grad():
        plain = model(ids, mask)
    _, acts = capture(model, ids, mask, names)
    logits, choice = acts[names[0]], acts[names[1]]
    assert logits.shape == (*ids.shape, cfg.num_experts) and choice.shape == (*ids.shape, cfg.num_experts_per_tok)
    assert torch.equal(choice, torch.topk(torch.softmax(logits.float(), -1), cfg.num_experts_per_tok).indices)
    with torch.no_grad():
        # The same choice handed back as a new tensor takes the re-routing path and must change nothing.
        same = model(ids, mask, hooks={names[1]: lambda x, name: x.clone()})
        forced = model(ids, mask, hooks={names[1]: lambda x, name: torch.zeros_like(x) + torch.arange(x.shape[-1])})
    assert torch.equal(same, plain)
    assert not torch.allclose(forced, plain, atol=1e-4)


def test_an_unknown_hook_point_is_one_clear_error(model):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(LmforgeError) as err:
        model(ids, hooks={"blocks.0.hook_resid_prev": lambda x, name: None})
    message = str(err.value)
    assert "'blocks.0.hook_resid_prev'" in message and "did you mean blocks.0.hook_resid_pre" in message
    assert "blocks.{i}.<point> for i in 0.." in message and "attn.hook_pattern" in message
    with pytest.raises(LmforgeError, match="blocks.99.hook_resid_post"):
        model(ids, hooks={"blocks.99.hook_resid_post": lambda x, name: None})


def test_the_pattern_needs_a_store_that_sees_the_whole_context(model):
    """A KV store other than none/static (the paged engine's) cannot give the pattern: a clear error."""

    class PerSequenceStep:  # stands in for the engine's PagedStep: attends, but has no whole-context view
        def __init__(self, mask):
            self.inner = no_cache_step(mask)
            self.positions = self.inner.positions

        def begin(self, attention_mask):
            return self

        def attend(self, attn, q, k, v, layer):
            return self.inner.attend(attn, q, k, v, layer)

    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(model(ids, cache=PerSequenceStep(mask)), model(ids))  # the store itself works
        with pytest.raises(LmforgeError, match="paged engine"):
            model(ids, cache=PerSequenceStep(mask), hooks={"blocks.0.attn.hook_pattern": lambda x, name: None})


def test_the_pattern_of_a_decode_step_over_the_static_cache(model):
    """generate's one-token step (SlotStep) can be hooked too: the pattern spans the whole buffer, zero on
    slots that hold no token, and the step's logits are the unhooked ones."""
    ids, mask = left_padded_batch(seed=9, length=6)
    b, max_len = ids.shape[0], 12
    plain_cache, hooked_cache = model.new_cache(b, max_len), model.new_cache(b, max_len)
    seen = {}
    with torch.no_grad():
        model(ids, mask, cache=plain_cache)
        model(ids, mask, cache=hooked_cache)
        token = ids[:, -1]
        plain = model.decode_step(token, plain_cache)
        step = hooked_cache.begin_slot(b, model.attention_windows)
        hooked = model(token[:, None], cache=step,
                       hooks={"blocks.0.attn.hook_pattern": lambda x, name: seen.setdefault("pattern", x)})[:, -1]
    assert torch.allclose(hooked, plain, atol=1e-5)
    pattern = seen["pattern"]
    assert pattern.shape == (b, model.config.heads(0), 1, max_len)
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    empty = ~hooked_cache.valid  # left padding and the slots not yet written
    assert float(pattern.masked_select(empty[:, None, None, :]).abs().max()) == 0.0
