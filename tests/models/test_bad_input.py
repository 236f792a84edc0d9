"""Bad checkpoints give one clear error naming the problem, never a traceback from deep inside."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge import load_model
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models.config import SUPPORTED_MODEL_TYPES

from .hf_factory import save_hf_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf_model("llama", tmp_path_factory.mktemp("llama") / "m")


@pytest.fixture
def copy(llama_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(llama_dir, dst)
    return dst


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_path_is_not_a_directory(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(f)


def test_malformed_config_json(copy):
    (copy / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(copy)


def test_unsupported_model_type_lists_supported(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "bert"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_model(copy)
    msg = str(e.value)
    assert "bert" in msg
    for name in SUPPORTED_MODEL_TYPES:
        assert name in msg


def test_wrong_shape_names_the_tensor(copy):
    state = load_file(copy / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    state[name] = torch.zeros(state[name].shape[0] + 16, state[name].shape[1])
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[48, 64\], expected \[32, 64\]"):
        load_model(copy)


def test_missing_tensor_names_it(copy):
    state = load_file(copy / "model.safetensors")
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor model.layers.0.mlp.up_proj.weight"):
        load_model(copy)


def test_unexpected_tensor_is_reported(copy):
    state = load_file(copy / "model.safetensors")
    state["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(2, 2)
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensors .*layers.7"):
        load_model(copy)


def test_config_that_disagrees_with_weights(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.2"):
        load_model(copy)


@pytest.mark.parametrize("keep", [0.5, 0.99, 16])
def test_truncated_safetensors(copy, keep):
    f = copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(CheckpointError, match="model.safetensors.*(truncated|corrupt)"):
        load_model(copy)


def test_missing_weights_file(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(copy)


def test_pytorch_bin_only_is_refused_not_unpickled(copy):
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"not a pickle we would ever open")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(copy)


def test_sharded_index_names_missing_shard(tmp_path):
    path = save_hf_model("llama", tmp_path / "m", max_shard_size="40KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"names the shard {shards[-1].name}, which does not exist"):
        load_model(path)


def test_bad_config_values_name_the_field(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["num_attention_heads"] = 5  # 64 is not divisible by 5, and 5 not by 2 kv heads
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="head"):
        load_model(copy)


def test_layer_count_is_checked_against_the_weights_before_the_model_is_built(copy, monkeypatch):
    from lmforge.models import checkpoint

    def no_build(config):  # building 10,000 layers (even on the meta device) took over a minute
        raise AssertionError(f"a model of {config.num_layers} layers was built before the layer count was checked")

    monkeypatch.setattr(checkpoint, "Transformer", no_build)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["num_hidden_layers"] = 10_000
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: num_hidden_layers=10000, but the weights hold layers "
                                              r"0\.\.1 only \(missing tensor model\.layers\.2\.\*\)"):
        load_model(copy)
    cfg["num_hidden_layers"] = 1
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=1, but the weights hold layers up to 1: "
                                              r"unexpected tensors model\.layers\.1\."):
        load_model(copy)


@pytest.mark.parametrize("field, value, match", [
    ("rms_norm_eps", -1e-6, "rms_norm_eps must be a positive finite number, got -1e-06"),  # loaded; NaN logits
    ("rms_norm_eps", 0, "rms_norm_eps must be a positive finite number, got 0"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a positive finite number, got nan"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps must be a positive finite number, got '1e-5'"),
    ("hidden_size", 32.5, "hidden_size must be an integer, got 32.5"),  # int() made it 32
    ("hidden_size", True, "hidden_size must be an integer, got True"),
    ("intermediate_size", "128", "intermediate_size must be an integer, got '128'"),
    ("num_hidden_layers", 2.5, "num_hidden_layers must be an integer, got 2.5"),
    ("vocab_size", -5, "vocab_size must be positive, got -5"),
    ("num_key_value_heads", 0, "num_key_value_heads must be positive, got 0"),
    ("eos_token_id", "</s>", "eos_token_id must be a token id or a list of them"),
])
def test_config_values_are_typed_and_in_range(copy, field, value, match):
    cfg = json.loads((copy / "config.json").read_text())
    cfg[field] = value
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: .*" + match.replace("(", r"\(").replace(")", r"\)")):
        load_model(copy)


def test_integral_float_sizes_still_load(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["hidden_size"] = float(cfg["hidden_size"])  # 64.0 is 64: some tools write JSON numbers that way
    (copy / "config.json").write_text(json.dumps(cfg))
    assert load_model(copy).config.hidden_size == cfg["hidden_size"]


def test_config_from_a_dict_is_checked_too():
    from lmforge.models.config import Config

    base = {"model_type": "llama", "vocab_size": 64, "hidden_size": 66, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4}
    with pytest.raises(ConfigError, match="hidden_size=66 is not divisible by num_attention_heads=4"):
        Config.from_hf(base)
    assert Config.from_hf({**base, "head_dim": 16}).head_dim == 16  # an explicit head_dim needs no division
    with pytest.raises(ConfigError, match="n_embd=66 is not divisible by n_head=4"):
        Config.from_hf({"model_type": "gpt2", "vocab_size": 64, "n_embd": 66, "n_head": 4, "n_layer": 1,
                        "n_positions": 32})
    with pytest.raises(ConfigError, match="rope_theta must be a positive finite number, got -10000.0"):
        Config.from_hf({**base, "head_dim": 16, "rope_theta": -10000.0})
    with pytest.raises(ConfigError, match="norm_eps must be a positive finite number"):
        Config(norm_eps=-1.0)  # built directly (recipes' model.config goes through from_hf)
    with pytest.raises(ConfigError, match="num_layers must be a positive integer, got True"):
        Config(num_layers=True)
