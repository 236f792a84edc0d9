"""Steering through the HTTP server with the real `openai` client: a registry of named vectors loaded from
files, ``"steering": {"name", "scale"}`` in ``extra_body``, unknown names and bad scales as 400s."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.models.steering import SteeringVector

from .tiny_server import running, save_tiny_chat_model

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("gguf")

WIDTH = 32  # save_tiny_chat_model's hidden size


def random_vector(seed: int, width: int = WIDTH, layers=(1,)) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({i: torch.randn(width, generator=g) for i in layers}, model_hint="llama")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lmforge.engine.engine import Engine
    from lmforge.serve.cli import steering_registry
    from lmforge.serve.server import build_app

    root = tmp_path_factory.mktemp("steer")
    path = save_tiny_chat_model(root / "tiny")
    random_vector(1).save(root / "happy.gguf")  # the two file formats, through the CLI's NAME=PATH parser
    random_vector(2, layers=(0, 1)).save(root / "sad.safetensors")
    vectors = steering_registry([f"happy={root / 'happy.gguf'}", f"sad={root / 'sad.safetensors'}"])
    app = build_app(Engine(path, max_num_batched_tokens=64), "tiny", steering_vectors=vectors)
    with running(app) as base:
        yield base, app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def complete(client, steering=None, **kw) -> str:
    extra = {"steering": steering} if steering is not None else None
    r = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=16, temperature=0,
                                  extra_body=extra, **kw)
    return r.choices[0].text


def test_steering_changes_the_output_and_scale_zero_does_not(client):
    plain = complete(client)
    happy = complete(client, {"name": "happy", "scale": 12.0})
    assert happy != plain
    assert complete(client, {"name": "happy", "scale": 12.0}) == happy  # deterministic, via the prefix cache too
    assert complete(client, {"name": "sad", "scale": 12.0}) not in (happy, plain)
    assert complete(client, {"name": "happy", "scale": 0}) == plain
    assert complete(client) == plain  # the steered requests left no trace in the shared KV blocks


def test_steered_chat_streams_the_same_text(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "fox"}], max_tokens=12, temperature=0,
              extra_body={"steering": {"name": "sad", "scale": 10.0}})
    full = client.chat.completions.create(**kw).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
              if c.choices]
    assert "".join(pieces) == full
    plain = client.chat.completions.create(**{**kw, "extra_body": None}).choices[0].message.content
    assert full != plain


def test_steered_output_equals_generate_with_the_same_steering(server, client):
    from lmforge.models.generate import generate
    from lmforge.models.steering import Steering

    engine = server[1].state.runner.engine
    steering = Steering(random_vector(1), 12.0)
    ids = engine.tokenizer.encode("the quick brown")
    ref = generate(engine.model, torch.tensor([ids]), max_new_tokens=16, steering=steering,
                   eos_ids=list(engine.eos_ids))[0].tolist()
    ref = [t for t in ref if t not in engine.eos_ids]
    assert complete(client, {"name": "happy", "scale": 12.0}) == engine.tokenizer.decode(ref)


@pytest.mark.parametrize("steering, match", [
    ({"name": "angry", "scale": 1.0}, "unknown steering vector 'angry'; this server has: 'happy', 'sad'"),
    ({"name": "happy", "scale": 1e6}, "steering.scale"),
    ({"name": "happy", "scale": "2"}, "steering.scale"),
    ({"scale": 2.0}, "steering.name"),
    ({"name": "happy", "scale": 2.0, "layers": [1]}, "steering.layers"),
])
def test_bad_steering_is_a_400(client, steering, match):
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, steering)
    assert err.value.status_code == 400 and match in err.value.body["message"]


def test_unknown_name_on_a_server_without_vectors_says_how_to_add_one(tmp_path):
    from lmforge.engine.engine import Engine
    from lmforge.serve.server import build_app

    app = build_app(Engine(save_tiny_chat_model(tmp_path / "tiny")), "tiny")
    with running(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError, match="--steering-vector NAME=PATH"):
            complete(client, {"name": "happy", "scale": 1.0})


def test_wrong_width_vector_fails_at_start_up(tmp_path):
    from lmforge.engine.engine import Engine
    from lmforge.serve.server import build_app

    engine = Engine(save_tiny_chat_model(tmp_path / "tiny"))
    with pytest.raises(LmforgeError, match="steering vector 'wide' has width 64 but the model's hidden size is 32"):
        build_app(engine, "tiny", steering_vectors={"wide": random_vector(0, width=64)})


def test_steering_vector_flag_errors(tmp_path):
    from lmforge.serve.cli import steering_registry

    random_vector(1).save(tmp_path / "v.gguf")
    with pytest.raises(LmforgeError, match="NAME=PATH"):
        steering_registry([str(tmp_path / "v.gguf")])
    with pytest.raises(LmforgeError, match="given twice"):
        steering_registry([f"a={tmp_path / 'v.gguf'}", f"a={tmp_path / 'v.gguf'}"])
    with pytest.raises(LmforgeError, match="does not exist"):
        steering_registry([f"a={tmp_path / 'missing.gguf'}"])


def test_cli_generate_steer_changes_the_text_and_rejects_a_wrong_width(tmp_path, capsys):
    from lmforge.cli import main

    model = save_tiny_chat_model(tmp_path / "tiny")
    random_vector(1).save(tmp_path / "happy.gguf")
    random_vector(1, width=48).save(tmp_path / "wide.gguf")
    argv = ["generate", "--model", str(model), "--prompt", "the quick brown", "--max-new-tokens", "12"]
    texts = []
    for extra in ([], ["--steer", str(tmp_path / "happy.gguf"), "--steer-scale", "12"],
                  ["--steer", str(tmp_path / "happy.gguf"), "--steer-scale", "0"]):
        assert main(argv + extra) == 0
        texts.append(capsys.readouterr().out)
    assert texts[1] != texts[0] and texts[2] == texts[0]
    assert main(argv + ["--steer", str(tmp_path / "wide.gguf")]) == 2
    assert "has width 48 but the model's hidden size is 32" in capsys.readouterr().err


def test_serve_flag_loads_vectors_before_serving(tmp_path, monkeypatch):
    import lmforge.serve.server as server_module
    from lmforge.cli import main

    random_vector(1).save(tmp_path / "happy.gguf")
    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda *a, **kw: seen.update(kw))
    assert main(["serve", "--model", str(tmp_path), "--steering-vector", f"happy={tmp_path / 'happy.gguf'}"]) == 0
    assert list(seen["steering_vectors"]) == ["happy"] and seen["steering_vectors"]["happy"].layers == [1]
    assert main(["serve", "--model", str(tmp_path), "--steering-vector", "happy"]) == 2
