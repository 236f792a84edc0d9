"""Requests with images in the paged engine (LLaVA-style): greedy output equals ``generate`` on the same processor
batch, also when a prefill chunk boundary falls inside the image's tokens; the prefix cache shares blocks between
equal images and never between different ones; bad input."""

from __future__ import annotations

import pytest
import torch

from lmforge import load_model
from lmforge.data.image_processor import load_processor
from lmforge.engine import Engine, SamplingParams
from lmforge.errors import LmforgeError
from lmforge.models.generate import generate

pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from ..models.test_quant_vlm import save_tiny_vlm  # noqa: E402 - tiny random VLMs with processor and tokenizer

PROMPT = "USER: <image> what is this ? ASSISTANT:"
NEW = 6


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return load_model(tiny_llava_dir), load_processor(tiny_llava_dir)


def picture(i: int):
    img = Image.new("RGB", (40 + 9 * i, 36), (70 * i % 255, 180 - 50 * i, 40 + 30 * i))
    img.paste((255, 255, 0), (4 + 5 * i, 6, 20 + 5 * i, 24))
    return img


def run(engine: Engine, requests: list[tuple[list[int], torch.Tensor | None]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    ids = [engine.add_request(p, params, pixel_values=px) for p, px in requests]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [list(done[i]) for i in ids]


def reference(model, batch) -> list[int]:
    return generate(model, batch["input_ids"], pixel_values=batch["pixel_values"], max_new_tokens=NEW,
                    eos_ids=())[0].tolist()


@pytest.mark.parametrize("chunk", [512, 7])  # one prefill, or chunks of 7 that split the image's tokens
def test_greedy_equals_generate_with_several_images_in_flight(llava, chunk):
    model, processor = llava
    batches = [processor(PROMPT, [picture(i)]) for i in range(3)]
    engine = Engine(model, block_size=4, max_num_batched_tokens=chunk, num_blocks=128)
    got = run(engine, [(b["input_ids"][0].tolist(), b["pixel_values"]) for b in batches])
    want = [reference(model, b) for b in batches]
    assert got == want
    n_image = model.config.num_image_tokens
    assert chunk == 512 or n_image > chunk  # the chunked case really cuts through an image


def test_prefix_cache_shares_equal_images_only(llava):
    model, processor = llava
    a, b = processor(PROMPT, [picture(0)]), processor(PROMPT, [picture(1)])
    engine = Engine(model, block_size=4, num_blocks=128)

    def computed(batch) -> int:
        before = engine.stats["prompt_computed_tokens"]
        out = run(engine, [(batch["input_ids"][0].tolist(), batch["pixel_values"])])
        assert out == [reference(model, batch)]  # a cache hit never changes the output
        return engine.stats["prompt_computed_tokens"] - before

    length = a["input_ids"].shape[1]
    assert computed(a) == length
    again = computed(a)
    assert again < length and again <= length % 4 + 4  # only the last, partly filled block is computed again
    assert computed(b) == length  # a different image: no block shared, not even the text before it


def test_text_requests_still_run_on_a_llava_engine(llava):
    model, processor = llava
    ids = processor.tokenizer.encode("what is this ?")
    engine = Engine(model, block_size=4, num_blocks=64)
    assert run(engine, [(ids, None)]) == [generate(model, torch.tensor([ids]), max_new_tokens=NEW, eos_ids=())[0]
                                          .tolist()]


def test_bad_image_requests_are_one_clear_error(llava, tmp_path):
    model, processor = llava
    batch = processor(PROMPT, [picture(0)])
    ids, pixels = batch["input_ids"][0].tolist(), batch["pixel_values"]
    engine = Engine(model, block_size=4, num_blocks=64)
    with pytest.raises(LmforgeError, match=r"16 image tokens \(id 127\) but no pixel_values"):
        engine.add_request(ids)
    with pytest.raises(LmforgeError, match=r"holds \d+ image tokens but 2 image\(s\) need"):
        engine.add_request(ids, pixel_values=torch.cat([pixels, pixels]))
    with pytest.raises(LmforgeError, match="pixel_values must be"):
        engine.add_request(ids, pixel_values=pixels[0])
    assert not engine.has_unfinished()
    with pytest.raises(LmforgeError, match="text-only model"):
        Engine(model.language_model, block_size=4, num_blocks=64).add_request(ids[:3], pixel_values=pixels)
    mllama = load_model(save_tiny_vlm("mllama", tmp_path / "mllama"))
    with pytest.raises(LmforgeError, match="cross-attention models do not run in the paged engine"):
        Engine(mllama)
