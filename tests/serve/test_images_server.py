"""Images through the OpenAI server (a LLaVA-style model) with the real `openai` client: ``image_url`` parts as
data URLs, greedy output equal to ``generate`` on the same processor batch, streaming, the prefix cache shared by
equal images only, concurrent requests, and every kind of bad image as a 400 while the server keeps serving."""

from __future__ import annotations

import base64
import io
import threading

import pytest

from lmforge.data.image_processor import load_processor
from lmforge.models.generate import generate
from lmforge.serve.limits import ServerLimits

from ..engine.test_images import picture  # the drawn test images, one per index
from .tiny_server import running

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
Image = pytest.importorskip("PIL.Image")
NEW = 6


def data_url(img, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def chat(url: str, text: str = "what is this ?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def server(tiny_llava_dir):
    from lmforge.engine.engine import Engine
    from lmforge.serve.server import build_app

    path = tiny_llava_dir
    engine = Engine(path, block_size=4, max_num_batched_tokens=64)
    processor = load_processor(path)
    limits = ServerLimits(max_images=2, max_image_pixels=80 * 80)
    with running(build_app(engine, "tiny", processor=processor, limits=limits)) as base:
        yield base, engine, processor


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(server, img, text: str = "what is this ?") -> str:
    _, engine, processor = server
    batch = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text},
                                                                         {"type": "image"}]}], images=[img])
    new = generate(engine.vision_model, batch["input_ids"], pixel_values=batch["pixel_values"], max_new_tokens=NEW,
                   eos_ids=sorted(engine.eos_ids))[0].tolist()
    cut = next((i for i, t in enumerate(new) if t in engine.eos_ids), len(new))
    return processor.tokenizer.decode(new[:cut], skip_special_tokens=True)


def test_openai_client_sends_an_image_and_gets_generate_s_answer(server, client):
    img = picture(0)
    r = client.chat.completions.create(model="tiny", messages=chat(data_url(img)), max_tokens=NEW, temperature=0)
    assert r.choices[0].message.content == reference(server, img)
    stream = client.chat.completions.create(model="tiny", messages=chat(data_url(img)), max_tokens=NEW,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reference(server, img)


def test_equal_images_share_the_prefix_cache_and_different_ones_do_not(server, client):
    engine = server[1]

    def computed(img) -> int:
        before = engine.stats["prompt_computed_tokens"]
        r = client.chat.completions.create(model="tiny", messages=chat(data_url(img), "hi"), max_tokens=2,
                                           temperature=0)
        assert r.usage.prompt_tokens > 0
        return engine.stats["prompt_computed_tokens"] - before

    first = computed(picture(3))
    assert computed(picture(3)) < first // 2  # the same pixels again: its blocks come from the cache
    assert computed(picture(4)) == first  # other pixels, same text: nothing shared


def test_concurrent_image_requests_all_complete(server, client):
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        r = client.chat.completions.create(model="tiny", messages=chat(data_url(picture(i))), max_tokens=NEW,
                                           temperature=0)
        results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {i: reference(server, picture(i)) for i in range(4)}


@pytest.mark.parametrize("url,message", [
    ("https://example.com/cat.png", "must be a data: URL .* fetches nothing"),
    ("data:text/plain;base64,aGVsbG8=", "must be a base64 data URL of an image"),
    ("data:image/png;base64,@@not-base64@@", "base64 payload is corrupt"),
    ("data:image/png;base64," + base64.b64encode(b"\x89PNG but not really" * 4).decode(), "not a readable image"),
    (None, r"is 100x100 pixels; this server takes at most 6400"),
])
def test_bad_images_are_400s_and_the_server_keeps_serving(server, client, url, message):
    url = url or data_url(Image.new("RGB", (100, 100)))
    with pytest.raises(openai.BadRequestError, match=message) as err:
        client.chat.completions.create(model="tiny", messages=chat(url), max_tokens=2)
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == "messages"
    ok = client.chat.completions.create(model="tiny", messages=chat(data_url(picture(1))), max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_too_many_images_and_a_model_without_images_are_400s(server, client):
    url = data_url(picture(0))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 3}]
    with pytest.raises(openai.BadRequestError, match="hold 3 images; this server takes at most 2"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    from lmforge.serve.server import build_app

    with running(build_app(server[1], "tiny")) as base:  # no processor: a text server
        text_client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError, match="takes no images"):
            text_client.chat.completions.create(model="tiny", messages=chat(url), max_tokens=2)
