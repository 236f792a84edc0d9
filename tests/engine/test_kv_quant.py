"""Quantized KV cache (KIVI 2/4-bit, int8): the quantizers against hand computation, byte accounting, the
engine's plumbing against an independent fake-quantization reference, and every engine feature with it."""

from __future__ import annotations

import pytest
import torch

from lmforge.engine import Engine, SamplingParams
from lmforge.engine.kv_quant import (
    KV_CACHE_DTYPES,
    dequantize_int8,
    dequantize_keys_per_channel,
    dequantize_values_per_token,
    minmax_quantize,
    pack_bits,
    parse_kv_cache_dtype,
    quantize_int8_per_token,
    quantize_keys_per_channel,
    quantize_values_per_token,
    unpack_bits,
)
from lmforge.errors import LmforgeError

QUANTIZED = ["int8", "kivi4", "kivi2"]


# ---- quantizer math -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_exact(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, 5, 16 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_pack_layout_by_hand():
    # code i sits at bit offset bits * (i % per_byte) of byte i // per_byte
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_bits(torch.tensor([5, 12], dtype=torch.uint8), 4).tolist() == [5 | 12 << 4]


def test_minmax_by_hand():
    # 2 bits over [-1, 2]: zero -1, scale 1 (both exact in float16); codes round((x + 1) / 1)
    x = torch.tensor([[-1.0, 0.4, 0.6, 2.0]])
    codes, scale, zero = minmax_quantize(x, -1, 2)
    assert codes.tolist() == [[0, 1, 2, 3]] and scale.item() == 1.0 and zero.item() == -1.0
    assert scale.dtype == zero.dtype == torch.float16


def test_keys_per_channel_values_per_token_by_hand():
    # one block of 2 tokens, 1 head, 4 channels; channel 3 is an outlier channel (KIVI's case for keys)
    k = torch.tensor([[[[0.0, 1.0, -2.0, 100.0]], [[3.0, 2.0, 2.0, 103.0]]]])  # [1, 2, 1, 4]
    packed, scale, zero = quantize_keys_per_channel(k, 2)
    assert scale.shape == zero.shape == (1, 1, 4)  # statistics per channel, over the block's tokens
    assert zero.float().tolist() == [[[0.0, 1.0, -2.0, 100.0]]]
    exact = torch.tensor([3.0, 1.0, 4.0, 3.0]) / 3  # range / (2^2 - 1) per channel
    assert (scale.float()[0, 0] >= exact).all() and torch.allclose(scale.float()[0, 0], exact, rtol=1e-3)
    deq = dequantize_keys_per_channel(packed, scale, zero, 2, torch.float32)
    # ranges 3 (ch 0, 3) and 1 / 4 (ch 1, 2): the outlier channel costs no precision on the others
    assert torch.equal(deq[..., 0], k[..., 0]) and torch.equal(deq[..., 3], k[..., 3])
    assert (deq - k).abs().max() <= scale.float().max() / 2
    v = k.clone()
    packed, scale, zero = quantize_values_per_token(v, 4, group=2)
    assert scale.shape == (1, 2, 1, 2)  # per token, per group of 2 channels
    assert zero.float().tolist() == [[[[0.0, -2.0]], [[2.0, 2.0]]]]


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_error_within_half_a_step(bits):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 16, 2, 64, generator=g) * 3 + torch.randn(1, 1, 2, 64, generator=g) * 20  # channel offsets
    packed, scale, zero = quantize_keys_per_channel(x, bits)
    err = (dequantize_keys_per_channel(packed, scale, zero, bits, torch.float32) - x).abs()
    assert (err <= scale.float().unsqueeze(1) / 2 * (1 + 1e-3) + 1e-6).all()
    packed, scale, zero = quantize_values_per_token(x, bits, 32)
    deq = dequantize_values_per_token(packed, scale, zero, bits, torch.float32)
    step = scale.float().repeat_interleave(32, -1)
    assert ((deq - x).abs() <= step / 2 * (1 + 1e-3) + 1e-6).all()
    # Per-channel keys beat per-token keys on channel-offset data (the asymmetry KIVI argues for).
    pt, ps, pz = quantize_values_per_token(x, bits, 64)
    per_token_err = (dequantize_values_per_token(pt, ps, pz, bits, torch.float32) - x).abs().mean()
    assert err.mean() < per_token_err


def test_int8_per_token_symmetric():
    x = torch.tensor([[1.27, -0.5, 0.0, 0.01]])
    codes, scale = quantize_int8_per_token(x)
    assert codes.dtype == torch.int8 and scale.shape == (1, 1)
    assert codes[0, 0].item() == 127 or codes[0, 0].item() == 126  # absmax lands on the top code
    err = (dequantize_int8(codes, scale, torch.float32) - x).abs()
    assert (err <= scale.float() / 2 + 1e-7).all()


def test_constant_and_huge_groups_stay_finite():
    x = torch.full((1, 4, 1, 8), 7.0)
    x[0, :, 0, 1] = 1e6  # beyond float16: saturates instead of producing inf / nan
    for name in QUANTIZED:
        fmt = KV_CACHE_DTYPES[name]
        k, v = fmt.dequantize(fmt.quantize(x, x), torch.float32)
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
        if fmt.kind == "kivi":  # per-channel keys: the constant channel is exact next to the saturated one
            assert torch.equal(k[..., 0], x[..., 0])


def test_unknown_dtype_lists_the_valid_ones():
    with pytest.raises(LmforgeError, match="valid: auto, kivi2, kivi4, int8"):
        parse_kv_cache_dtype("fp8")
    assert parse_kv_cache_dtype("auto") is None


# ---- byte accounting ------------------------------------------------------------------------------------
def test_bytes_per_token_exact(tiny_model):
    model = tiny_model("llama")
    cfg = model.config
    layers, heads, d, bs = cfg.num_layers, cfg.kv_heads(0), cfg.head_dim, 8
    g = 32 if d % 32 == 0 else d
    per_head_token = {  # keys + values, per layer and KV head, for one token
        "auto": 2 * d * 4,
        "int8": 2 * (d + 2),
        "kivi4": d // 2 + 2 * 2 * d / bs + d // 2 + 2 * 2 * d // g,
        "kivi2": d // 4 + 2 * 2 * d / bs + d // 4 + 2 * 2 * d // g,
    }
    for name, expected in per_head_token.items():
        engine = Engine(model, block_size=bs, num_blocks=10, max_num_seqs=3, kv_cache_dtype=name)
        assert engine.kv_bytes_per_token() == expected * layers * heads
        staging = engine.kv_staging_slots * 2 * bs * layers * heads * d * 4
        assert engine.runner.kv_cache_bytes() == 10 * bs * expected * layers * heads + staging
    # A fixed budget: the staging slots come off the top, the rest buys quantized blocks.
    budget = 1 << 18  # small enough that the budget, not max_num_seqs x max_model_len, sets the pool
    float_engine = Engine(model, block_size=bs, max_num_seqs=3, kv_cache_bytes=budget, max_model_len=4096)
    engine = Engine(model, block_size=bs, max_num_seqs=3, kv_cache_bytes=budget, kv_cache_dtype="kivi2",
                    max_model_len=4096)
    staging = 3 * 2 * bs * layers * heads * d * 4
    assert engine.block_manager.num_blocks == (budget - staging) // int(per_head_token["kivi2"] * bs * layers * heads)
    assert engine.runner.kv_cache_bytes() <= budget
    assert engine.block_manager.num_blocks > 2 * float_engine.block_manager.num_blocks


def test_engine_argument_errors(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(LmforgeError, match="unknown kv_cache_dtype 'int4'; valid: auto, kivi2, kivi4, int8"):
        Engine(model, num_blocks=8, kv_cache_dtype="int4")
    with pytest.raises(LmforgeError, match="multiple of block_size"):
        Engine(model, block_size=8, num_blocks=8, kv_cache_dtype="kivi2", kv_residual_length=12)
    with pytest.raises(LmforgeError, match="applies to a quantized KV cache"):
        Engine(model, num_blocks=8, kv_residual_length=16)
    with pytest.raises(LmforgeError, match="speculative"):
        Engine(model, num_blocks=8, kv_cache_dtype="kivi4", draft_model=model)
    with pytest.raises(LmforgeError, match="staging"):
        Engine(model, block_size=8, max_num_seqs=64, kv_cache_bytes=1000, kv_cache_dtype="kivi2")


# ---- the engine against an independent reference ------------------------------------------------------
class FakeQuantStep:
    """Reference KV store for one sequence: float K/V per layer; when attending, the blocks that were
    already behind the full-precision window before this call (``keep_from`` blocks) are read through
    quantize -> dequantize, everything else in float. This is the engine's contract, written plainly."""

    def __init__(self, store: list, fmt, bs: int, rb: int, start: int, n: int) -> None:
        self.store, self.fmt, self.bs, self.start, self.n = store, fmt, bs, start, n
        self.keep_from = max(start // bs - rb, 0)
        self.positions = torch.arange(start, start + n)[None]

    def begin(self, attention_mask):
        return self

    def attend(self, attn, q, k, v, layer):
        if len(self.store) <= layer:
            self.store.append([k[0][:, :0], v[0][:, :0]])
        ks, vs = self.store[layer]
        ks, vs = torch.cat((ks, k[0]), 1), torch.cat((vs, v[0]), 1)  # [K, T, D]
        self.store[layer] = [ks, vs]
        m = self.keep_from * self.bs
        if m:
            blocks_k = ks[:, :m].transpose(0, 1).unflatten(0, (self.keep_from, self.bs))  # [m, bs, K, D]
            blocks_v = vs[:, :m].transpose(0, 1).unflatten(0, (self.keep_from, self.bs))
            dk, dv = self.fmt.dequantize(self.fmt.quantize(blocks_k, blocks_v), ks.dtype)
            ks = torch.cat((dk.flatten(0, 1).transpose(0, 1), ks[:, m:]), 1)
            vs = torch.cat((dv.flatten(0, 1).transpose(0, 1), vs[:, m:]), 1)
        if self.n > 1:
            assert self.start == 0, "the reference prefills in one call"
        return attn.attention(q, ks[None], vs[None], None, causal=self.n > 1)


@torch.inference_mode()
def fake_quant_generate(model, prompt: list[int], max_new: int, name: str, bs: int, rb: int) -> list[int]:
    fmt, store, out = KV_CACHE_DTYPES[name], [], []
    tokens, start = list(prompt), 0
    while len(out) < max_new:
        feed = tokens[start:]
        step = FakeQuantStep(store, fmt, bs, rb, start, len(feed))
        logits = model(torch.tensor([feed]), cache=step)  # [1, T, vocab]
        start = len(tokens)
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        tokens.append(nxt)
    return out


def prompts_for(seed: int, count: int, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


@pytest.mark.parametrize("name,residual", [("kivi2", 0), ("kivi4", 0), ("int8", 0), ("kivi2", 8)])
def test_engine_matches_fake_quant_reference(name, residual, tiny_model):
    """Batched decoding with a quantized pool = the plain reference, token for token (prompts prefilled in one
    chunk each, no prefix sharing, so the float values that get quantized are the same on both sides)."""
    model = tiny_model("llama")
    bs, max_new = 4, 20
    prompts = prompts_for(3, 6)
    engine = Engine(model, block_size=bs, num_blocks=200, max_num_seqs=6, max_num_batched_tokens=512,
                    enable_prefix_caching=False, kv_cache_dtype=name, kv_residual_length=residual)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outs]
    want = [fake_quant_generate(model, p, max_new, name, bs, residual // bs) for p in prompts]
    assert got == want
    assert not engine.runner.slot_of and engine.runner.staging_grown == 0


def float_outputs(model, prompts, params, **kw) -> list[list[int]]:
    engine = Engine(model, num_blocks=400, **kw)
    return [s.token_ids for o in engine.generate(prompts, params) for s in o.outputs]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(fraction of identical sequences, fraction of tokens equal before the first divergence)."""
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    prefix = 0
    for x, y in zip(a, b):
        prefix += next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
    return same, prefix / sum(len(x) for x in a)


@pytest.mark.parametrize("name,residual", [("int8", 0), ("kivi4", 0), ("kivi2", 0), ("kivi2", 8)])
def test_engine_features_with_quantized_cache(name, residual, tiny_model):
    """Continuous batching, chunked prefill, preemption, prefix-cache hits and n > 1 forks all run with a
    quantized pool, leak nothing, never grow the staging pool (residual 0), and stay close to the float cache."""
    model = tiny_model("llama")
    shared = prompts_for(5, 1, 30, 31)[0]
    prompts = [shared + p if i % 2 == 0 else p for i, p in enumerate(prompts_for(6, 10, 1, 20))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kw = dict(block_size=4, max_num_seqs=6, max_num_batched_tokens=24)
    engine = Engine(model, num_blocks=40, kv_cache_dtype=name, kv_residual_length=residual, **kw)
    outs = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.hit_tokens > 0
    got = [o.outputs[0].token_ids for o in outs]
    same, prefix = agreement(got, float_outputs(model, prompts, params, **kw))
    print(f"{name} residual {residual}: identical {same:.0%}, tokens before divergence {prefix:.0%}")
    assert same >= {"int8": 0.9, "kivi4": 0.4, "kivi2": 0.2}[name]
    assert prefix >= {"int8": 0.9, "kivi4": 0.6, "kivi2": 0.4}[name]
    # n > 1: the samples fork after prefill (partly filled block copied with its float staging slot);
    # greedy samples must therefore all be equal to each other.
    forked = engine.generate([shared + [5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, n=3, ignore_eos=True))
    samples = [s.token_ids for s in forked[0].outputs]
    assert samples[0] == samples[1] == samples[2]
    sampled = engine.generate([shared[:9]], SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=0))
    assert len(sampled[0].outputs) == 3
    bm, runner = engine.block_manager, engine.runner
    assert bm.num_free_blocks == bm.num_blocks and all(c == 0 for c in bm.ref_count)
    assert runner.slot_of.keys() == runner._pending.keys()  # only cached blocks awaiting quantization
    if residual == 0:
        assert not runner.slot_of and runner.staging_grown == 0


def test_window_covering_everything_is_the_float_cache(tiny_model):
    """A full-precision window longer than any sequence never quantizes: outputs equal the float engine's
    exactly, through preemption, the prefix cache and forks (the staging plumbing alone)."""
    model = tiny_model("llama")
    shared = prompts_for(5, 1, 30, 31)[0]
    prompts = [shared + p if i % 2 == 0 else p for i, p in enumerate(prompts_for(7, 8, 1, 20))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2)
    kw = dict(block_size=4, max_num_seqs=6, max_num_batched_tokens=24)
    engine = Engine(model, num_blocks=28, kv_cache_dtype="kivi2", kv_residual_length=256, **kw)
    got = [s.token_ids for o in engine.generate(prompts, params) for s in o.outputs]
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.hit_tokens > 0
    assert got == float_outputs(model, prompts, params, **kw)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt2"])  # sliding window, soft-capping, learned positions
def test_other_families_run_quantized(family, tiny_model):
    """The quantized step serves every attention variant: int8 stays on the float cache's greedy path, KIVI
    runs through chunked prefill and the prefix cache without error."""
    model = tiny_model(family)
    shared = prompts_for(5, 1, 30, 31)[0]
    prompts = [shared + p if i % 2 == 0 else p for i, p in enumerate(prompts_for(8, 6, 1, 20))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    kw = dict(block_size=8, max_num_seqs=4, max_num_batched_tokens=32)
    ref = float_outputs(model, prompts, params, **kw)
    got = {name: [o.outputs[0].token_ids for o in Engine(model, num_blocks=64, kv_cache_dtype=name, **kw)
                  .generate(prompts, params)] for name in ("int8", "kivi2")}
    assert agreement(got["int8"], ref)[0] >= 5 / 6
    assert all(len(x) == 10 for x in got["kivi2"])
