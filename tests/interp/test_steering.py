"""Steering vectors: CAA / PCA math against hand computations, hooks, generate, GGUF/safetensors files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.interp.steering import (Steering, SteeringVector, contrastive_vector, paired_differences, pca_vector,
                                     steering_hooks)
from lmforge.models.config import Config
from lmforge.models.generate import generate
from lmforge.models.model import Transformer

WIDTH, LAYERS = 32, 3


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models: one intra-op thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def model() -> Transformer:
    cfg = Config.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=WIDTH, intermediate_size=64,
                              num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=128))
    return Transformer(cfg).init_weights(std=0.2, seed=0).eval()


POS = [[5, 9, 12, 3], [7, 7, 1], [20, 21, 22, 23, 24], [2, 40]]
NEG = [[5, 9, 13], [8, 7, 1, 30], [20, 21, 25], [2, 41, 42]]


def read_one(model, ids: list[int], layer: int) -> torch.Tensor:
    """resid_post of ``layer`` for one unpadded prompt: [T, d]."""
    seen = {}
    model(torch.tensor([ids]), hooks={f"blocks.{layer}.hook_resid_post": lambda x, n: seen.update(x=x[0])})
    return seen["x"]


@pytest.mark.parametrize("position", ["last", "mean"])
def test_contrastive_vector_is_the_mean_paired_difference(model, position):
    vec = contrastive_vector(model, None, POS, NEG, layers=[0, 2], position=position, batch_size=3)
    assert vec.layers == [0, 2] and vec.width == WIDTH and vec.model_hint == "llama"
    for layer in (0, 2):
        pick = (lambda a: a[-1]) if position == "last" else (lambda a: a.mean(0))
        diffs = [pick(read_one(model, p, layer)) - pick(read_one(model, n, layer)) for p, n in zip(POS, NEG)]
        expected = torch.stack(diffs).mean(0)
        torch.testing.assert_close(vec.directions[layer], expected, atol=1e-5, rtol=1e-5)


def test_first_component_hand_computation():
    """Differences m + t_k * e0: centred, they vary only along e0, so the component is +-e0, signed by m."""
    from lmforge.interp.steering import _first_component

    t = torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=torch.float64)
    e0 = torch.zeros(4, dtype=torch.float64)
    e0[0] = 1.0
    for m0, sign in ((1.0, 1.0), (-1.0, -1.0)):
        m = torch.tensor([m0, 3.0, 0.0, 0.0], dtype=torch.float64)
        diffs = m + t[:, None] * e0
        torch.testing.assert_close(_first_component(diffs, True, 0), sign * e0)
    # Uncentred, the top singular vector of identical rows is their (normalised) direction.
    rows = torch.tensor([[3.0, 4.0]] * 3, dtype=torch.float64)
    torch.testing.assert_close(_first_component(rows, False, 0), torch.tensor([0.6, 0.8], dtype=torch.float64))
    with pytest.raises(LmforgeError, match="do not vary"):
        _first_component(rows, True, 0)


def test_pca_vector_matches_numpy_svd_and_points_along_the_mean(model):
    vec = pca_vector(model, None, POS, NEG, layers=1)
    diffs = paired_differences(model, None, POS, NEG, layers=1)[1].double().numpy()
    centred = diffs - diffs.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    pc = vt[0] if vt[0] @ diffs.mean(0) >= 0 else -vt[0]
    got = vec.directions[1].double().numpy()
    np.testing.assert_allclose(got, pc, atol=1e-5)
    assert abs(np.linalg.norm(got) - 1.0) < 1e-5 and got @ diffs.mean(0) > 0
    assert vec.metadata["method"] == "pca_center" and vec.metadata["pairs"] == "4"


def test_bad_pairs_and_layers_are_clear_errors(model):
    with pytest.raises(LmforgeError, match="equally many"):
        contrastive_vector(model, None, POS, NEG[:2], layers=0)
    with pytest.raises(LmforgeError, match="3 layers"):
        contrastive_vector(model, None, POS, NEG, layers=[3])
    with pytest.raises(LmforgeError, match="position"):
        contrastive_vector(model, None, POS, NEG, layers=0, position="first")
    with pytest.raises(LmforgeError, match="tokenizer"):
        contrastive_vector(model, None, ["text"], ["more text"], layers=0)


def random_vector(layers=(1,), width=WIDTH, seed=0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({i: torch.randn(width, generator=g) for i in layers}, model_hint="llama")


def test_hooks_add_exactly_scale_times_v_at_resid_post(model):
    vec = random_vector(layers=(1,))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    name = "blocks.1.hook_resid_post"
    plain, after = {}, {}
    model(ids, hooks={name: lambda x, n: plain.update({n: x.clone()})})
    hooks = steering_hooks(vec, 2.5)
    assert list(hooks) == [name]
    # Our hook then a reader: the reader sees the unsteered activation plus exactly 2.5 * v.
    ours = model(ids, hooks={name: [hooks[name], lambda x, n: after.update({n: x.clone()})]})
    assert torch.equal(after[name], plain[name] + 2.5 * vec.directions[1])
    manual = model(ids, hooks={name: lambda x, n: x + 2.5 * vec.directions[1]})
    assert torch.equal(ours, manual)
    assert not torch.equal(ours, model(ids))


def test_generate_with_steering(model):
    ids = torch.tensor([[3, 4, 5, 6, 7], [9, 9, 2, 1, 8]])
    vec = random_vector(layers=(0, 1))
    plain = generate(model, ids, max_new_tokens=12, eos_ids=())
    assert torch.equal(generate(model, ids, max_new_tokens=12, eos_ids=(), steering=Steering(vec, 0.0)), plain)
    steered = generate(model, ids, max_new_tokens=12, eos_ids=(), steering=Steering(vec, 20.0))
    assert not torch.equal(steered, plain)
    # steering= is the same as passing the hooks: prompt and every decode step are steered.
    hooked = generate(model, ids, max_new_tokens=12, eos_ids=(), hooks=steering_hooks(vec, 20.0))
    assert torch.equal(hooked, steered)
    # ... and as decoding by hand with full forward passes, the hooks on every call.
    seq = ids.clone()
    for _ in range(12):
        nxt = model(seq, hooks=steering_hooks(vec, 20.0))[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(seq[:, ids.shape[1]:], steered)


def test_generate_rejects_compile_with_hooks_and_unknown_hook_points(model):
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(LmforgeError, match="compile"):
        generate(model, ids, max_new_tokens=2, compile=True, steering=Steering(random_vector(), 1.0))
    with pytest.raises(LmforgeError, match="unknown hook point"):
        generate(model, ids, max_new_tokens=2, hooks={"blocks.9.hook_resid_post": lambda x, n: None})


def test_wrong_width_is_one_clear_error(model):
    narrow = random_vector(width=16)
    with pytest.raises(LmforgeError, match=r"width 16 but the model's hidden size is 32"):
        generate(model, torch.tensor([[3, 4]]), max_new_tokens=2, steering=Steering(narrow, 1.0))
    with pytest.raises(LmforgeError, match="layer 7 but the model has 3 layers"):
        random_vector(layers=(7,)).check(model)
    with pytest.raises(LmforgeError, match="different widths"):
        SteeringVector({1: torch.zeros(4), 2: torch.zeros(5)})
    with pytest.raises(LmforgeError, match="finite"):
        Steering(random_vector(), float("nan"))


def test_gguf_round_trip_in_llama_cpp_format(tmp_path):
    gguf = pytest.importorskip("gguf")
    vec = SteeringVector({1: torch.randn(WIDTH), 3: torch.randn(WIDTH)}, model_hint="llama",
                         metadata={"method": "caa"})
    path = vec.save(tmp_path / "happy.gguf")
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.3"]
    for layer in (1, 3):
        t = tensors[f"direction.{layer}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [WIDTH]
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), vec.directions[layer].numpy())
    back = SteeringVector.load(path)
    assert back.layers == [1, 3] and back.width == WIDTH and back.model_hint == "llama"
    assert back.metadata == {"method": "caa"} and back.fingerprint == vec.fingerprint


def test_gguf_written_by_gguf_writer_directly_loads(tmp_path):
    """A file as repeng / llama.cpp's cvector-generator write it (no lmforge keys, int32 layer_count)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "ext.gguf"), "controlvector")
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_int32("controlvector.layer_count", 1)
    writer.add_tensor("direction.2", np.arange(WIDTH, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vec = SteeringVector.load(tmp_path / "ext.gguf")
    assert vec.layers == [2] and vec.model_hint == "mistral"
    assert torch.equal(vec.directions[2], torch.arange(WIDTH, dtype=torch.float32))


def test_safetensors_round_trip_and_file_errors(tmp_path):
    pytest.importorskip("gguf")
    vec = SteeringVector({0: torch.randn(8), 2: torch.randn(8)}, model_hint="gpt2", metadata={"pairs": "4"})
    back = SteeringVector.load(vec.save(tmp_path / "v.safetensors"))
    assert back.layers == [0, 2] and back.model_hint == "gpt2" and back.metadata == {"pairs": "4"}
    assert all(torch.equal(back.directions[i], vec.directions[i]) for i in (0, 2))
    with pytest.raises(LmforgeError, match="layer-0"):
        vec.save(tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()
    with pytest.raises(LmforgeError, match="suffix"):
        vec.save(tmp_path / "v.pt")
    with pytest.raises(LmforgeError, match="does not exist"):
        SteeringVector.load(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(LmforgeError, match="neither"):
        SteeringVector.load(tmp_path / "junk.gguf")
