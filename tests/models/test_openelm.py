"""OpenELM: layer-wise scaling shapes, an independent reference forward over the HF tensor layout, round trips.

transformers has no OpenELM class, so the reference below re-derives Apple's modeling code
(qkv_proj rows = [q; k; v] heads, q/k RMSNorm per head, proj_1 = [gate; up]) from the raw
checkpoint tensors, independently of lmforge's weight map.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge import load_model, save_model
from lmforge.models.config import Config, make_divisible, openelm_layer_sizes
from lmforge.models.model import Transformer

OPENELM_270M = dict(model_type="openelm", num_transformer_layers=16, model_dim=1280, head_dim=64, num_gqa_groups=4,
                    qkv_multipliers=[0.5, 1.0], ffn_multipliers=[0.5, 4.0], ffn_dim_divisor=256, vocab_size=32000,
                    max_context_length=2048, normalize_qk_projections=True, share_input_output_layers=True,
                    rope_freq_constant=10000, activation_fn_name="swish", ffn_with_glu=True)

TINY = dict(OPENELM_270M, num_transformer_layers=4, model_dim=64, head_dim=8, num_gqa_groups=2,
            qkv_multipliers=[0.5, 1.0], ffn_multipliers=[0.5, 2.0], ffn_dim_divisor=16, vocab_size=96,
            max_context_length=64)


def test_270m_layer_sizes_match_apple_release():
    q, kv, ffn = openelm_layer_sizes(OPENELM_270M)
    # The values in apple/OpenELM-270M's published config.json.
    assert q == [12] * 5 + [16] * 7 + [20] * 4
    assert kv == [3] * 5 + [4] * 7 + [5] * 4
    assert ffn == [768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 3840, 4352, 4608, 4864, 5120]
    assert Config.from_hf(OPENELM_270M).num_params() == 271_527_168


def test_layer_sizes_follow_the_formula():
    cfg = dict(TINY, num_transformer_layers=7, qkv_multipliers=[0.4, 1.3], ffn_multipliers=[0.3, 3.7])
    q, kv, ffn = openelm_layer_sizes(cfg)
    import numpy as np
    for i, (qm, fm) in enumerate(zip(np.linspace(0.4, 1.3, 7), np.linspace(0.3, 3.7, 7))):
        qm, fm = round(float(qm), 2), round(float(fm), 2)
        assert q[i] == make_divisible(64 * qm, 8 * 2) // 8
        assert kv[i] == q[i] // 2
        assert ffn[i] == make_divisible(64 * fm, 16)
    assert len(set(q)) > 1 and len(set(ffn)) > 1  # the test exercises scaling


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_forward(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    q_heads, kv_heads, _ = openelm_layer_sizes(cfg)
    hd = cfg["head_dim"]
    x = sd["transformer.token_embeddings.weight"][ids]
    b, t, _ = x.shape
    for i in range(cfg["num_transformer_layers"]):
        p = f"transformer.layers.{i}."
        h = _rms(x, sd[p + "attn_norm.weight"])
        qkv = (h @ sd[p + "attn.qkv_proj.weight"].T).view(b, t, q_heads[i] + 2 * kv_heads[i], hd).transpose(1, 2)
        q, k, v = qkv.split([q_heads[i], kv_heads[i], kv_heads[i]], dim=1)
        q, k = _rms(q, sd[p + "attn.q_norm.weight"]), _rms(k, sd[p + "attn.k_norm.weight"])
        q, k = _rope(q, cfg["rope_freq_constant"]), _rope(k, cfg["rope_freq_constant"])
        rep = q_heads[i] // kv_heads[i]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + a @ sd[p + "attn.out_proj.weight"].T
        h = _rms(x, sd[p + "ffn_norm.weight"])
        gate, up = (h @ sd[p + "ffn.proj_1.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ sd[p + "ffn.proj_2.weight"].T
    x = _rms(x, sd["transformer.norm.weight"])
    return x @ sd["transformer.token_embeddings.weight"].T


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model = Transformer(Config.from_hf(TINY))
    model.init_weights(std=0.05, seed=0)
    with torch.no_grad():  # non-trivial norms so the reference checks which norm goes where
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return save_model(model, tmp_path_factory.mktemp("openelm") / "m"), model


def test_checkpoint_layout_and_config(tiny_dir):
    path, model = tiny_dir
    sd = load_file(path / "model.safetensors")
    q, kv, ffn = openelm_layer_sizes(TINY)
    for i in range(TINY["num_transformer_layers"]):
        assert sd[f"transformer.layers.{i}.attn.qkv_proj.weight"].shape == ((q[i] + 2 * kv[i]) * 8, 64)
        assert sd[f"transformer.layers.{i}.attn.out_proj.weight"].shape == (64, q[i] * 8)
        assert sd[f"transformer.layers.{i}.ffn.proj_1.weight"].shape == (2 * ffn[i], 64)
        assert sd[f"transformer.layers.{i}.ffn.proj_2.weight"].shape == (64, ffn[i])
    assert "lm_head.weight" not in sd  # shared input/output layers
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "openelm" and cfg["qkv_multipliers"] == TINY["qkv_multipliers"]
    assert sum(v.numel() for v in sd.values()) == model.config.num_params()


def test_forward_matches_independent_reference(tiny_dir):
    path, _ = tiny_dir
    sd = load_file(path / "model.safetensors")
    ids = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    model = load_model(path)
    with torch.no_grad():
        ours = model(ids)
        ref = reference_forward(sd, TINY, ids)
    assert ours.shape == (2, 17, TINY["vocab_size"])
    assert (ours - ref).abs().max().item() < 1e-4


def test_round_trip_and_cached_decode(tiny_dir, tmp_path):
    path, model = tiny_dir
    loaded = load_model(path)
    again = load_model(save_model(loaded, tmp_path / "again"))
    ids = torch.randint(0, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = loaded(ids)
        assert torch.equal(full, again(ids))
        cache = loaded.new_cache(1, 32)
        parts = [loaded(ids[:, :5], cache=cache), loaded(ids[:, 5:9], cache=cache), loaded(ids[:, 9:], cache=cache)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5
