"""oneDNN-packed float32 linears: same outputs as nn.Linear, inference-only, reversible, used by the engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import load_model
from lmforge.errors import LmforgeError
from lmforge.models import generate
from lmforge.models.packed import (PACKED_MIN_ROWS, PackedLinear, is_packed, pack_linears, packing_available,
                                   unpack_linears)

from .hf_factory import left_padded_batch, save_hf_model

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf_model("llama", tmp_path_factory.mktemp("packed") / "llama")


@pytest.mark.parametrize("rows", [1, 7, 16, 100])
@pytest.mark.parametrize("shape", [(48, 80), (1024, 1024)])
def test_packed_linear_matches_linear(rows, shape):
    torch.manual_seed(0)
    linear = nn.Linear(*shape, bias=True)
    packed = PackedLinear.of(linear)
    for x in (torch.randn(rows, shape[0]), torch.randn(2, rows, shape[0])):
        with torch.no_grad():
            torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
    assert packed.weight is linear.weight


def test_packed_copy_is_used_and_refreshed_after_an_update():
    torch.manual_seed(0)
    packed = PackedLinear.of(nn.Linear(32, 24))
    x = torch.randn(PACKED_MIN_ROWS, 32)
    with torch.no_grad():
        packed(x)
        first = packed._packed
        packed(x)
        assert packed._packed is first  # reused, not re-packed per call
        packed.weight.mul_(2.0)  # an optimizer step's kind of in-place update
        torch.testing.assert_close(packed(x), F.linear(x, packed.weight, packed.bias), atol=1e-5, rtol=1e-5)
        assert packed._packed is not first


def test_packed_model_logits_and_generation_match(llama_dir):
    model, packed = load_model(llama_dir), load_model(llama_dir)
    linears = sum(type(m) is nn.Linear for m in packed.modules())
    assert linears >= 7 * model.config.num_layers + 1  # q k v o, gate up down, LM head
    assert pack_linears(packed) == linears
    assert is_packed(packed) and not is_packed(model)
    ids, mask = left_padded_batch(length=24)  # 3 x 24 rows: the packed path
    with torch.no_grad():
        torch.testing.assert_close(packed(ids, mask), model(ids, mask), atol=1e-4, rtol=0)
    prompt = ids[:1, -8:]
    assert torch.equal(generate(packed, prompt, max_new_tokens=12), generate(model, prompt, max_new_tokens=12))


def test_packed_model_trains_like_the_dense_one_and_unpacks(llama_dir):
    model, packed = load_model(llama_dir), load_model(llama_dir)
    before = {k: v.clone() for k, v in packed.state_dict().items()}
    pack_linears(packed)
    assert all(torch.equal(packed.state_dict()[k], v) for k, v in before.items())  # saves as its dense self
    if model.config.tie_embeddings:
        assert packed.lm_head.weight is packed.model.embed_tokens.weight
    ids, mask = left_padded_batch(length=24)
    grads = []
    for m in (model, packed):
        m.train()
        m(ids, mask).float().pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, atol=1e-6, rtol=1e-5)
    unpack_linears(packed)
    assert not is_packed(packed) and all(torch.equal(packed.state_dict()[k], v) for k, v in before.items())


def test_pack_refuses_other_dtypes(llama_dir):
    with pytest.raises(LmforgeError, match="float32"):
        pack_linears(load_model(llama_dir, dtype=torch.bfloat16))


def test_engine_packs_what_it_loads_and_nothing_else(llama_dir):
    from lmforge.engine import Engine, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=10)
    prompts = [[5, 9, 23, 4], [7, 7, 31, 2, 18, 40, 3]]
    owned = Engine(llama_dir, max_num_seqs=4)
    assert is_packed(owned.model)  # loaded from a path: nothing else can train it
    given = load_model(llama_dir)
    shared = Engine(given, max_num_seqs=4)
    assert not is_packed(given)  # a caller's model (RL trains it in place) is left as it is
    assert Engine(llama_dir, max_num_seqs=4, packed_weights=False).model is not None
    assert not is_packed(Engine(llama_dir, max_num_seqs=4, packed_weights=False).model)
    a = [o.outputs[0].token_ids for o in owned.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in shared.generate(prompts, params)]
    assert a == b


def test_autocast_takes_the_dense_op():
    torch.manual_seed(0)
    linear = nn.Linear(64, 64)
    packed = PackedLinear.of(linear)
    x = torch.randn(PACKED_MIN_ROWS, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed(x).dtype == linear(x).dtype == torch.bfloat16
        assert torch.equal(packed(x), linear(x))
    assert packed._packed is None  # never packed: every call so far took the dense op
