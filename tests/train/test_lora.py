"""LoRA/DoRA: training mechanics, merging, and parity with PEFT's adapter format in both directions."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge import load_model
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.models.checkpoint import hf_state_dict
from lmforge.models.model import Transformer
from lmforge.train.lora import (LoraConfig, LoraLinear, apply_lora, load_adapter, lora_parameters, merge_lora,
                                save_adapter)

from ..models.hf_factory import VOCAB, build_hf_model

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """family -> saved tiny HF model directory (built once per module)."""
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            build_hf_model(family).save_pretrained(path)
            cache[family] = path
        return cache[family]

    return get


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Random non-zero adapters (B = 0 at init would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(p.shape, generator=g) * 0.1
                p.add_(noise.to(p.dtype))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---- training mechanics -----------------------------------------------------------------------------
def test_only_adapters_train(model_dirs):
    model = load_model(model_dirs("llama"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = apply_lora(model, LoraConfig(r=4, target_modules=ALL))
    assert len(wrapped) == 2 * 7 and all(isinstance(model.get_submodule(n), LoraLinear) for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.{a}" for w in wrapped for a in ("lora_A", "lora_B")}
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}

    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model(ids()).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert all(model.get_submodule(w).lora_B.grad.abs().sum() > 0 for w in wrapped)
    opt.step()
    after = dict(model.named_parameters())
    for n, p in before.items():  # base names are unchanged by wrapping, and so are their values
        assert torch.equal(after[n], p), n
    assert any(not torch.equal(model.get_submodule(w).lora_B, torch.zeros_like(model.get_submodule(w).lora_B))
               for w in wrapped)


def test_dora_magnitude_trains(model_dirs):
    model = load_model(model_dirs("llama"))
    apply_lora(model, LoraConfig(r=4, use_dora=True))
    perturb(model)
    model(ids()).logsumexp(-1).mean().backward()
    mags = [m.lora_magnitude for m in model.modules() if isinstance(m, LoraLinear)]
    assert mags and all(m.requires_grad and m.grad is not None and m.grad.abs().sum() > 0 for m in mags)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_identity_at_init_and_merge_matches(model_dirs, use_dora):
    path = model_dirs("qwen2")  # q/k/v biases exercise the DoRA bias handling
    x = ids()
    base = load_model(path)
    ref = logits(base, x)
    model = load_model(path)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=("all-linear",), use_dora=use_dora))
    assert torch.allclose(logits(model, x), ref, atol=1e-6)

    perturb(model)
    unmerged = logits(model, x)
    assert (unmerged - ref).abs().max() > 1e-2  # the adapters do something
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert model.state_dict().keys() == base.state_dict().keys()
    assert torch.allclose(logits(model, x), unmerged, atol=1e-5)


def test_dropout_only_in_training(model_dirs):
    model = load_model(model_dirs("llama"))
    apply_lora(model, LoraConfig(r=4, dropout=0.5, use_dora=True))
    perturb(model)
    x = ids()
    model.eval()
    assert torch.equal(logits(model, x), logits(model, x))
    model.train()
    assert not torch.allclose(logits(model, x), logits(model, x))


def test_meta_model_and_state_dict_round_trip(model_dirs):
    """The trainer's path: apply_lora on a meta model, then load a trained state dict with assign=True."""
    model = load_model(model_dirs("llama"))
    apply_lora(model, LoraConfig(r=4, use_dora=True))
    perturb(model)
    with torch.device("meta"):
        view = Transformer(model.config)
    apply_lora(view, LoraConfig(r=4, use_dora=True))
    view.load_state_dict(model.state_dict(), strict=True, assign=True)
    x = ids()
    assert torch.equal(logits(view, x), logits(model, x))
    assert hf_state_dict(model).keys() == hf_state_dict(load_model(model_dirs("llama"))).keys()


# ---- PEFT format -------------------------------------------------------------------------------------
@pytest.fixture
def peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_saved_adapter_loads_in_peft(peft, model_dirs, tmp_path, family, use_dora):
    path = model_dirs(family)
    model = load_model(path)
    config = LoraConfig(r=4, alpha=8, target_modules=ALL, use_dora=use_dora)
    apply_lora(model, config)
    perturb(model)
    save_adapter(model, tmp_path / "adapter", config, base_model=str(path))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == sorted(ALL) and saved["use_dora"] is use_dora

    hf = peft.PeftModel.from_pretrained(build_hf_model(family), tmp_path / "adapter").eval()
    x = ids()
    ours, ref = logits(model, x), logits(hf, x)
    assert (ours - logits(load_model(path), x)).abs().max() > 1e-2
    assert (ours - ref).abs().max() <= ATOL


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_loads_in_lmforge(peft, model_dirs, tmp_path, use_dora):
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=list(ALL), use_dora=use_dora)
    hf = peft.get_peft_model(build_hf_model("llama"), cfg).eval()
    perturb(hf, seed=3)
    hf.save_pretrained(tmp_path / "adapter")

    model = load_model(model_dirs("llama"))
    config = load_adapter(model, tmp_path / "adapter")
    assert (config.r, config.alpha, config.use_dora) == (4, 16, use_dora)
    assert set(config.target_modules) == set(ALL)
    x = ids()
    assert (logits(model, x) - logits(hf, x)).abs().max() <= ATOL
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}


def test_partial_target_writes_full_names(model_dirs, tmp_path):
    """Targets narrower than a layer name must not widen into every q_proj when PEFT reads them."""
    model = load_model(model_dirs("llama"))
    config = LoraConfig(r=2, target_modules=("layers.1.self_attn.q_proj",))
    assert apply_lora(model, config) == ["model.layers.1.self_attn.q_proj"]
    save_adapter(model, tmp_path / "a", config)
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    fresh = load_model(model_dirs("llama"))
    load_adapter(fresh, tmp_path / "a")
    assert [n for n, m in fresh.named_modules() if isinstance(m, LoraLinear)] == ["model.layers.1.self_attn.q_proj"]


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, kwargs", [("r", dict(r=0)), ("alpha", dict(alpha=-1.0)),
                                           ("dropout", dict(dropout=1.0)), ("target_modules", dict(target_modules=()))])
def test_bad_config(field, kwargs):
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        LoraConfig(**kwargs).validate()


def test_target_matching_nothing(model_dirs):
    model = load_model(model_dirs("llama"))
    with pytest.raises(ConfigError, match=r"qkv.*match no Linear.*q_proj"):
        apply_lora(model, LoraConfig(target_modules=("qkv",)))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_load_adapter_errors(model_dirs, tmp_path):
    model = load_model(model_dirs("llama"))
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    config = LoraConfig(r=4)
    lora = load_model(model_dirs("llama"))
    apply_lora(lora, config)
    save_adapter(lora, tmp_path / "a", config)

    cfg_file = tmp_path / "a" / "adapter_config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(raw | {"r": 8}))
    with pytest.raises(CheckpointError, match=r"lora_A.weight of model.layers.0.self_attn.q_proj has shape \[4, 64\]"):
        load_adapter(model, tmp_path / "a")
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # left untouched

    cfg_file.write_text(json.dumps(raw))
    weights = tmp_path / "a" / "adapter_model.safetensors"
    extra = "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"  # the model has 2 layers
    save_file(load_file(weights) | {extra: torch.zeros(4, 64)}, weights)
    with pytest.raises(CheckpointError, match=r"match no layer.*layers\.9"):
        load_adapter(model, tmp_path / "a")

    cfg_file.write_text(json.dumps(raw | {"use_rslora": True}))
    with pytest.raises(CheckpointError, match="use_rslora"):
        load_adapter(model, tmp_path / "a")


@pytest.mark.parametrize("family, target, ok", [("phi3", "q_proj", False), ("phi3", "o_proj", True),
                                                ("gpt2", "q_proj", False)])
def test_save_refuses_layouts_peft_cannot_express(model_dirs, tmp_path, family, target, ok):
    model = load_model(model_dirs(family))
    config = LoraConfig(r=2, target_modules=(target,))
    apply_lora(model, config)
    if ok:
        save_adapter(model, tmp_path / "a", config)
    else:
        with pytest.raises(LmforgeError, match="fused"):
            save_adapter(model, tmp_path / "a", config)
        assert not (tmp_path / "a").exists()
