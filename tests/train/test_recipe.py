"""Recipes: YAML + overrides into typed config, with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.errors import ConfigError
from lmforge.train.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = """
task: pretrain
model: {config: {model_type: llama, vocab_size: 64, hidden_size: 32, intermediate_size: 64,
                 num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}}
data: {train: [corpus.txt], seq_len: 32}
optim: {lr: 3e-4}
"""


def test_yaml_and_overrides(tmp_path):
    cfg = load_recipe(write(tmp_path, BASE), ["optim.lr=1e-3", "batch_size=4", "lora.enabled=true",
                                              "lora.target_modules=[q_proj, v_proj]", "data.train=other.txt"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.batch_size == 4 and cfg.lora.enabled and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.train == ["other.txt"] and cfg.data.seq_len == 32


@pytest.mark.parametrize("text, override, match", [
    (BASE + "optimm: {lr: 1}\n", [], "unknown recipe field 'optimm'"),
    (BASE, ["optim.lrr=1"], "unknown recipe field 'optim.lrr'"),
    (BASE, ["batch_size=two"], "'batch_size' must be int"),
    (BASE, ["batch_size=0"], "'batch_size' must be positive"),
    (BASE, ["task=rlhf"], r"'task' must be one of \['pretrain', 'sft', 'dpo', 'rm'\]"),
    (BASE, ["optim.betas=[0.9]"], "'optim.betas' must be two numbers"),
    (BASE, ["lora.r=0"], "'lora.r' must be positive"),
    (BASE, ["data.seq_len=true"], "'data.seq_len' must be int"),
    (BASE, ["nonsense"], "must look like key=value"),
    ("model: [1, 2\n", [], "not valid YAML"),
    ("- a\n- b\n", [], "must be a mapping"),
    ("data: {train: [x]}\n", [], "recipe field 'model' needs"),
    (BASE, ["task=sft", "data.replay.fraction=0.2"], "'data.replay.train' must list pretraining sources"),
    (BASE, ["task=sft", "data.replay.train=[x]", "data.replay.fraction=1.0"], "'data.replay.fraction' must be in"),
    (BASE, ["data.replay.train=[x]", "data.replay.fraction=0.2"], "'data.replay' mixes pretraining text into SFT"),
    (BASE, ["task=sft", "data.replay.train=[x]", "data.replay.fraction=0.2", "data.replay.seq_len=100000"],
     "'data.replay.seq_len' must be in 2..data.seq_len"),
])
def test_malformed_recipes_name_the_field(tmp_path, text, override, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(write(tmp_path, text), override)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_shipped_recipes_are_valid():
    shipped = sorted(RECIPES.glob("*.yaml"))
    assert shipped, "recipes/ should ship example recipes"
    for path in shipped:
        load_recipe(path)
