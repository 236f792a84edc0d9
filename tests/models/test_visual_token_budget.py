"""HiRED-style visual token budget for LLaVA (``visual_token_fraction``): the class-token attention it ranks by
equals transformers' CLIP attention maps, the kept features are the top-scoring ones in order, and the budget
works the same in ``generate`` and the paged engine (fewer image tokens, fewer KV blocks)."""

from __future__ import annotations

import pytest
import torch

from lmforge import load_model
from lmforge.data.image_processor import load_processor
from lmforge.engine import Engine, SamplingParams
from lmforge.errors import LmforgeError
from lmforge.models.generate import generate

from . import test_llava as llava_tests

pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return tiny_llava_dir, load_model(tiny_llava_dir), load_processor(tiny_llava_dir)


def pixels(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_class_token_attention_equals_transformers_attention_maps(llava):
    path, model, _ = llava
    import transformers

    hf = transformers.LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    px = pixels()
    with torch.inference_mode():
        out = hf.model.vision_tower(px, output_attentions=True) if hasattr(hf, "model") else \
            hf.vision_tower(px, output_attentions=True)
        ours = model.image_token_scores(px)
    n_layers = len(model.vision_tower.layers)
    index = min(model.config.feature_layers[-1] % (n_layers + 1), n_layers - 1)
    ref = out.attentions[index][:, :, 0, :].mean(dim=1)[:, 1:]  # the class token's row, heads averaged
    assert ours.shape == ref.shape == (2, model.config.num_image_tokens)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_budget_keeps_the_top_scoring_features_in_order(llava):
    _, model, _ = llava
    px = pixels()
    with torch.inference_mode():
        full = model.image_features(px)
        scores = model.image_token_scores(px)
        try:
            model.visual_token_fraction = 0.25
            kept = model.image_features(px)
            assert model.tokens_per_image == kept.shape[1] == round(0.25 * model.config.num_image_tokens)
        finally:
            model.visual_token_fraction = 1.0
    for i in range(2):
        top = scores[i].topk(kept.shape[1]).indices.sort().values
        assert torch.equal(kept[i], full[i, top])
    assert torch.equal(model.image_features(px), full)  # back to all tokens
    model.visual_token_fraction = 0.0
    try:
        with pytest.raises(LmforgeError, match=r"visual_token_fraction must be in \(0, 1\]"):
            model.tokens_per_image
    finally:
        model.visual_token_fraction = 1.0


@pytest.mark.parametrize("fraction", [0.5, 0.1])
def test_budget_in_generate_and_the_engine_agree(llava, fraction):
    _, model, processor = llava
    img = Image.new("RGB", (40, 36), (200, 40, 90))
    model.visual_token_fraction = fraction
    try:
        processor.tokens_per_image = model.tokens_per_image
        batch = processor("USER: <image> what is this ? ASSISTANT:", [img])
        ids = batch["input_ids"][0].tolist()
        assert ids.count(llava_tests.IMAGE_TOKEN) == model.tokens_per_image < model.config.num_image_tokens
        want = generate(model, batch["input_ids"], pixel_values=batch["pixel_values"], max_new_tokens=5,
                        eos_ids=())[0].tolist()
        engine = Engine(model, block_size=4, num_blocks=64)
        out = None
        rid = engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                                 pixel_values=batch["pixel_values"])
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished and o.request_id == rid:
                    out = list(o.outputs[0].token_ids)
        assert out == want
        full = processor.tokens_per_image
        processor.tokens_per_image = model.config.num_image_tokens  # a processor not told of the budget
        bad = processor("USER: <image> what is this ? ASSISTANT:", [img])
        with pytest.raises(LmforgeError, match="image tokens but 1 image"):
            engine.add_request(bad["input_ids"][0].tolist(), pixel_values=bad["pixel_values"])
        processor.tokens_per_image = full
    finally:
        model.visual_token_fraction = 1.0
        processor.tokens_per_image = model.config.num_image_tokens


def test_engine_prefix_cache_keys_images_by_their_budget_too(llava):
    """The same image and text under two budgets that give the same token count (HiRED's top half, ToMe's merged
    half) are different features: the second request must not reuse the first one's image blocks."""
    _, model, processor = llava
    img = Image.new("RGB", (40, 36), (30, 160, 90))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine = Engine(model, block_size=4, num_blocks=64)
    try:
        for switch in ("visual_token_fraction", "visual_token_merge"):
            setattr(model, switch, 0.5)
            processor.tokens_per_image = model.tokens_per_image
            batch = processor("USER: <image> what is this ? ASSISTANT:", [img])
            want = generate(model, batch["input_ids"], pixel_values=batch["pixel_values"], max_new_tokens=4,
                            eos_ids=())[0].tolist()
            ids = batch["input_ids"][0].tolist()
            before = engine.stats["prompt_computed_tokens"]
            rid = engine.add_request(ids, params, pixel_values=batch["pixel_values"])
            out = None
            while engine.has_unfinished():
                for o in engine.step():
                    if o.finished and o.request_id == rid:
                        out = list(o.outputs[0].token_ids)
            assert out == want
            assert engine.stats["prompt_computed_tokens"] - before == len(ids)  # nothing reused from the other budget
            setattr(model, switch, 1.0)
    finally:
        model.visual_token_fraction = model.visual_token_merge = 1.0
        processor.tokens_per_image = model.config.num_image_tokens
