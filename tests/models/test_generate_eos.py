"""generate() stops at the checkpoint's end-of-turn / EOS ids by default (generation_config.json, which may list
several, and config.json), runs on with eos_ids=(), and save_model keeps generation_config.json as it was."""

from __future__ import annotations

import json

import torch

from lmforge import load_model, save_model
from lmforge.models import generate, generate_stream
from lmforge.models.config import Config
from lmforge.models.model import Transformer

PROMPT = torch.tensor([[5, 9, 13, 2]])
N = 12


def tiny(**hf) -> Transformer:
    cfg = Config.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64, **hf))
    return Transformer(cfg).init_weights(std=0.2, seed=0).eval()


def first_new_token_after(tokens: list[int], start: int) -> int:
    """The index of a token (at ``start`` or later) that does not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_generation_config_eos_list_stops_generate_by_default(tmp_path):
    free = generate(tiny(), PROMPT, max_new_tokens=N)[0].tolist()
    assert len(free) == N  # a model without eos ids runs to max_new_tokens
    k = first_new_token_after(free, 2)
    end_of_turn = free[k]
    other = next(i for i in range(64) if i not in free)
    path = save_model(tiny(), tmp_path / "m")
    gen = {"bos_token_id": 1, "eos_token_id": [other, end_of_turn], "do_sample": True, "temperature": 0.6}
    (path / "generation_config.json").write_text(json.dumps(gen))

    model = load_model(path)
    assert generate(model, PROMPT, max_new_tokens=N)[0].tolist() == free[:k + 1]  # stops at the end of turn
    assert len(list(generate_stream(model, PROMPT, max_new_tokens=N))) == k + 1
    assert generate(model, PROMPT, max_new_tokens=N, eos_ids=())[0].tolist() == free  # disabled: runs on
    assert generate(model, PROMPT, max_new_tokens=N, eos_ids=[])[0].tolist() == free
    from lmforge.models.generate import default_eos_ids

    assert default_eos_ids(model) == [other, end_of_turn]

    # Saving keeps generation_config.json as loaded; config.json is what it was.
    again = save_model(model, tmp_path / "again")
    assert json.loads((again / "generation_config.json").read_text()) == gen
    assert json.loads((again / "config.json").read_text()) == json.loads((path / "config.json").read_text())


def test_config_json_eos_stops_generate_by_default():
    free = generate(tiny(), PROMPT, max_new_tokens=N)[0].tolist()
    k = first_new_token_after(free, 1)
    model = tiny(eos_token_id=free[k])
    assert generate(model, PROMPT, max_new_tokens=N)[0].tolist() == free[:k + 1]
    assert generate(model, PROMPT, max_new_tokens=N, eos_ids=())[0].tolist() == free
