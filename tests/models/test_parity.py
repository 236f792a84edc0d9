"""Parity with transformers: logits, greedy decoding with our KV cache, and save round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge import load_model, save_model
from lmforge.models import generate
from lmforge.models.config import Config

from .hf_factory import FAMILIES, VOCAB, build_hf_model, left_padded_batch

transformers = pytest.importorskip("transformers")
ATOL = 1e-4


def hf_logits(hf, ids, mask):
    # generate() derives positions from the mask; forward() alone does not (GPT-2 would shift).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def masked_max_diff(a, b, mask):
    return ((a - b).abs() * mask[..., None]).max().item()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build_hf_model(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


def test_logits_match_with_left_padding(family):
    name, hf, path = family
    model = load_model(path)
    ids, mask = left_padded_batch(seed=1, length=20)
    with torch.no_grad():
        ours = model(ids, mask)
    ref = hf_logits(hf, ids, mask)
    assert ours.shape == ref.shape == (3, 20, VOCAB)
    assert masked_max_diff(ours, ref, mask) <= ATOL, name
    assert ours.abs().max() > 0.1  # not a degenerate all-zero comparison


def test_greedy_decode_matches_hf_generate(family):
    name, hf, path = family
    model = load_model(path)
    ids, mask = left_padded_batch(seed=2, length=12)
    ours = generate(model, ids, mask, max_new_tokens=32, eos_ids=())  # as HF with eos_token_id=None
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    assert ours.shape == (3, 32)
    assert torch.equal(ours, ref), f"{name}: greedy tokens differ"


def test_kv_cache_matches_full_forward(family):
    """Decode token by token (and in chunks) through the cache == one full forward."""
    name, _, path = family
    model = load_model(path)
    ids, mask = left_padded_batch(seed=3, length=18)
    with torch.no_grad():
        full = model(ids, mask)
        cache = model.new_cache(3, 18)
        parts = [model(ids[:, :7], mask[:, :7], cache=cache), model(ids[:, 7:12], mask[:, 7:12], cache=cache)]
        parts += [model(ids[:, i:i + 1], mask[:, i:i + 1], cache=cache) for i in range(12, 18)]
    assert masked_max_diff(torch.cat(parts, dim=1), full, mask) <= ATOL, name


def test_save_roundtrip_loads_in_transformers(family, tmp_path):
    name, hf, path = family
    model = load_model(path)
    out = save_model(model, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert_same_weights(reloaded, hf)
    ids, mask = left_padded_batch(seed=4)
    assert masked_max_diff(hf_logits(reloaded, ids, mask), hf_logits(hf, ids, mask), mask) == 0.0
    again = load_model(out)
    with torch.no_grad():
        assert torch.equal(again(ids, mask), model(ids, mask))


def test_config_roundtrip(family):
    _, hf, path = family
    config = Config.from_hf(json.loads((path / "config.json").read_text()))
    assert Config.from_hf(config.to_hf()) == config
    model = load_model(path)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    assert config.num_params() == sum(p.numel() for p in hf.parameters())


def test_bf16_close_to_float32(family):
    """bf16 weights and activations: logits within 0.05 absolute (typ. logits here are O(1))."""
    name, _, path = family
    ids, mask = left_padded_batch(seed=5)
    with torch.no_grad():
        f32 = load_model(path)(ids, mask)
        bf16 = load_model(path, dtype=torch.bfloat16)(ids, mask)
    assert bf16.dtype == torch.bfloat16
    assert masked_max_diff(bf16.float(), f32, mask) < 0.05, name


def test_sharded_checkpoint(tmp_path):
    hf = build_hf_model("llama")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = load_model(tmp_path / "hf")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert masked_max_diff(model(ids, mask), hf_logits(hf, ids, mask), mask) <= ATOL
    # and we write shards that transformers reads
    save_model(model, tmp_path / "ours", max_shard_size="20KB")
    assert len(list((tmp_path / "ours").glob("model-*.safetensors"))) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert_same_weights(reloaded, hf)


def test_sliding_window_shorter_than_prompt_is_exercised():
    """Guard that the parity configs really test windows: mistral window 8 < prompt 20, gemma2 window 6."""
    assert FAMILIES["mistral"][2]["sliding_window"] < 20
    assert FAMILIES["gemma2"][2]["sliding_window"] < 12
    hf = build_hf_model("mistral")
    cfg = Config.from_hf(hf.config.to_dict())
    no_window = cfg.replace(sliding_window=None)
    from lmforge.models.model import Transformer
    a, b = Transformer(cfg), Transformer(no_window)
    b.load_state_dict(a.state_dict())
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert (a(ids) - b(ids)).abs().max() > 1e-3  # the window changes the result


def test_moe_load_balancing_loss_matches_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from lmforge.models.model import load_balancing_loss
    torch.manual_seed(0)
    logits = [torch.randn(12, 4), torch.randn(12, 4)]
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[0, :2] = 0
    for m in (None, mask):
        ours = load_balancing_loss(logits, 2, m)
        ref = load_balancing_loss_func(tuple(logits), 4, 2, m)
        assert torch.allclose(ours, ref, atol=1e-6)
    # perfectly uniform router -> top_k, fully collapsed -> num_experts
    assert torch.isclose(load_balancing_loss([torch.zeros(8, 4)], 2), torch.tensor(2.0))


def test_mixtral_aux_loss_after_forward(tmp_path):
    hf = build_hf_model("mixtral")
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids, mask = left_padded_batch()
    model(ids, mask)
    aux = model.aux_loss(mask)
    assert aux is not None and aux.item() > 0
    out = hf(input_ids=ids, attention_mask=mask, output_router_logits=True)
    assert torch.allclose(aux, out.aux_loss * hf.config.router_aux_loss_coef, atol=1e-6)
