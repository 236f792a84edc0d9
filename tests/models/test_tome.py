"""ToMe token merging (Bolya et al. 2023) in the vision tower: off by default and then bit-identical, bipartite soft
matching on a hand-checkable case, proportional attention as its formula, the per-block schedule, and LLaVA's
``visual_token_merge`` (exactly ``tokens_per_image`` features, the same output in ``generate`` and the engine, clear
errors)."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge import load_model
from lmforge.data.image_processor import load_processor
from lmforge.engine import Engine, SamplingParams
from lmforge.errors import LmforgeError
from lmforge.models.generate import generate
from lmforge.models.llava import LlavaForConditionalGeneration
from lmforge.models.vision import (VisionAttention, VisionConfig, VisionTransformer, fewest_tokens, merge_schedule,
                                   merge_tokens)

from . import test_llava as llava_tests

pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

PROMPT = "USER: <image> what is this ? ASSISTANT:"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    """The tiny CLIP + Llama LLaVA: 16 patches and a class token, 3 vision blocks, features after the second."""
    return load_model(tiny_llava_dir), load_processor(tiny_llava_dir)


def tower(class_token: bool = True, layers: int = 3) -> VisionTransformer:
    """A random tiny tower (CLIP-like, or SigLIP-like without a class token): 4x4 patches, hidden 32, 4 heads."""
    kind = dict(model_type="clip_vision_model", pooling="cls") if class_token else \
        dict(model_type="siglip_vision_model", pooling="none", pre_norm=False, patch_bias=True)
    config = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=4, image_size=32,
                          patch_size=8, class_token=class_token, **kind)
    torch.manual_seed(0)
    model = VisionTransformer(config).eval()
    with torch.no_grad():  # away from the init's ones and zeros so every path counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def pixels(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def plain_forward(model: VisionTransformer, px: torch.Tensor) -> list[torch.Tensor]:
    """The tower's hidden states as the forward computed them before token merging existed."""
    x = model.patch_embed(px).flatten(2).transpose(1, 2)
    x = torch.cat([model.class_embed.expand(x.shape[0], 1, -1), x], dim=1) + model.position_embed.weight
    x = model.pre_norm(x)
    hidden = [x]
    for block in model.layers:
        x = x + block.attn(block.attn_norm(x))
        x = x + block.mlp(block.mlp_norm(x))
        hidden.append(x)
    return hidden


# ---- the tower ---------------------------------------------------------------------------------------------------
def test_off_by_default_and_r_zero_are_bit_identical():
    model, px = tower(), pixels()
    with torch.inference_mode():
        want = plain_forward(model, px)
        off = model(px)
        zeros = model(px, merge=[0, 0, 0])  # the merging path, merging nothing
        late = model(px, merge=[0, 3])  # nothing changes before the first merge
        pooled = model.post_norm(want[-1][:, 0])
    assert off.merged is None and zeros.merged is None
    for out in (off, zeros):
        assert len(out.hidden_states) == len(want)
        assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, want))
        assert torch.equal(out.pooled, pooled)
    assert torch.equal(late.hidden_states[1], want[1])
    assert late.hidden_states[2].shape[1] == want[2].shape[1] - 3


def test_bipartite_matching_on_a_hand_checkable_case():
    # class token, then patches p0..p5: set A = p0, p2, p4 and set B = p1, p3, p5
    metric = torch.tensor([[1, 0, 0],  # the class token: p1's twin, but protected
                           [1, 0.2, 0], [1, 0, 0],  # p0 ~ p1 (cosine 0.98)
                           [0, 1, 0], [0, 0, 1],  # p2
                           [0.5, 0.5, 0.7], [0, 1, 0]])[None]  # p4 (best: p3, cosine 0.70), p5 = p2's twin
    x = torch.arange(7 * 2, dtype=torch.float32).view(1, 7, 2)
    size = torch.tensor([[1.0, 1, 1, 1, 1, 1, 3]])  # p5 already stands for 3 patches

    one = merge_tokens(x, metric, 1, size, protected=1)  # the duplicates go first
    p = x[0]
    assert torch.equal(one.x[0, 0], p[0])  # the class token, untouched and first
    assert torch.allclose(one.x[0], torch.stack([p[0], p[1], p[2], (p[3] + 3 * p[6]) / 4, p[4], p[5]]))
    assert one.size.tolist() == [[1, 1, 1, 4, 1, 1]]
    assert one.first.tolist() == [[0, 1, 2, 3, 4, 5]]  # the merged group sits where its first patch (p2) was

    two = merge_tokens(x, metric, 2, size, protected=1)  # then the next most similar edge, p0 -> p1
    assert torch.allclose(two.x[0], torch.stack([p[0], (p[1] + p[2]) / 2, (p[3] + 3 * p[6]) / 4, p[4], p[5]]))
    assert two.size.tolist() == [[1, 2, 4, 1, 1]] and two.size.sum() == size.sum()
    assert two.first.tolist() == [[0, 1, 3, 4, 5]]

    unprotected = merge_tokens(x, metric, 3, size)  # without protection the class token merges like any token
    assert unprotected.x.shape[1] == 4 and unprotected.size.sum() == size.sum()
    assert torch.equal(merge_tokens(x, metric, 0).x, x)
    with pytest.raises(LmforgeError, match=r"0\.\.3 of 6 mergeable tokens .* not 4"):
        merge_tokens(x, metric, 4, protected=1)


@pytest.mark.parametrize("class_token", [True, False])
def test_merged_tower_keeps_class_token_sizes_and_raster_order(class_token):
    model, px = tower(class_token), pixels()
    with torch.inference_mode():
        out = model(px, merge=[6, 3, 2])
        # ToMe's block, step by step: attention, merge on its keys (heads averaged), MLP; proportional attention after
        x, size, first, protected = out.hidden_states[0], None, None, int(class_token)
        for block, r in zip(model.layers, [6, 3, 2]):
            x, keys = block.attention_step(x, size=size)
            step = merge_tokens(x, keys.mean(dim=1), r, size, first, protected)
            x, size, first = block.mlp_step(step.x), step.size, step.first
    assert torch.allclose(x, out.hidden_states[-1], atol=1e-6)
    t = model.config.seq_len
    assert [h.shape[1] for h in out.hidden_states] == [t, t - 6, t - 9, t - 11]
    merged = out.merged
    assert torch.equal(merged.x, out.hidden_states[-1])
    assert torch.equal(merged.size.sum(dim=1), torch.full((2,), float(t)))  # every patch in exactly one token
    assert bool((merged.first.diff(dim=1) > 0).all())  # ordered by first patch
    if class_token:
        assert merged.first[:, 0].tolist() == [0, 0] and merged.size[:, 0].tolist() == [1, 1]
    with pytest.raises(LmforgeError, match=r"0\.\.8 of 16 mergeable"):
        model(px, merge=[9])
    with pytest.raises(LmforgeError, match="at most 3 non-negative integers"):
        model(px, merge=[1, 1, 1, 1])


def test_proportional_attention_is_the_explicit_formula():
    config = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(1)
    attn = VisionAttention(config).eval()
    x = torch.randn(2, 5, 32)
    size = torch.tensor([[1.0, 2, 1, 5, 1], [3, 1, 1, 1, 7]])
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, :, :, 4] = False  # a padded key, as the tiled encoder has

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 5, 4, 8).transpose(1, 2)

    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    logits = q @ k.transpose(-1, -2) / math.sqrt(8) + size.log()[:, None, None, :]
    with torch.no_grad():
        want = attn.o_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32))
        got, keys = attn.attend(x, size=size)
        assert torch.allclose(got, want, atol=1e-6) and torch.equal(keys, k)
        want_masked = attn.o_proj((logits.masked_fill(~mask, -math.inf).softmax(-1) @ v).transpose(1, 2)
                                  .reshape(2, 5, 32))
        assert torch.allclose(attn(x, mask, size), want_masked, atol=1e-6)
        # why: a token of size 3 weighs as its 3 patches would, were they still there (3 equal copies)
        copies = torch.cat([x[:, :1], x[:, 1:2].expand(-1, 3, -1), x[:, 2:]], dim=1)
        size3 = torch.tensor([[1.0, 3, 1, 1, 1]]).expand(2, -1)
        assert torch.allclose(attn(x, size=size3)[:, [0, 2, 3, 4]], attn(copies)[:, [0, 4, 5, 6]], atol=1e-6)


def test_schedule_is_exact_even_and_within_half():
    assert merge_schedule(17, 1, 2, 9) == [4, 4]  # constant where it can be
    assert merge_schedule(17, 1, 3, 10) == [3, 2, 2]  # the remainder first
    assert merge_schedule(17, 1, 2, 5) == [8, 4]  # raised early: the second block can halve 8 patches, not 9
    for tokens, protected, blocks in ((17, 1, 2), (577, 1, 23), (16, 0, 3), (27, 1, 4)):
        for target in range(fewest_tokens(tokens, protected, blocks), tokens + 1):
            schedule = merge_schedule(tokens, protected, blocks, target)
            mergeable = tokens - protected
            for r in schedule:
                assert 0 <= r <= mergeable // 2
                mergeable -= r
            assert mergeable + protected == target and len(schedule) == blocks
    assert fewest_tokens(577, 1, 23) == 2  # CLIP ViT-L/14-336 to layer -2 could go down to one patch token
    with pytest.raises(LmforgeError, match=r"cannot turn 17 tokens into 4 in 2 block\(s\): reachable are 5\.\.17"):
        merge_schedule(17, 1, 2, 4)


# ---- LLaVA's visual_token_merge -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction, schedule", [(0.5, [4, 4, 0]), (0.25, [8, 4, 0])])
def test_llava_merging_in_generate_and_the_engine(llava, fraction, schedule):
    model, processor = llava
    img = Image.new("RGB", (40, 36), (200, 40, 90))
    img.paste((255, 255, 0), (4, 6, 20, 24))
    n = model.config.num_image_tokens
    with torch.inference_mode():
        full = model.image_features(pixels())
    model.visual_token_merge = fraction
    try:
        assert model.tokens_per_image == round(n * fraction) and model.token_merge_schedule() == schedule
        with torch.inference_mode():
            features = model.image_features(pixels())
            merged = model.vision_tower(pixels(), merge=schedule).merged
        assert features.shape == (2, model.tokens_per_image, full.shape[-1])
        assert torch.equal(merged.size.sum(dim=1), torch.full((2,), float(n + 1)))  # 16 patches and the class token
        kept = [[any(torch.allclose(f, g, atol=1e-4) for g in full[i]) for f in features[i]] for i in range(2)]
        assert not any(map(all, kept))  # averages of merged tokens, not a selection of the full features
        processor.tokens_per_image = model.tokens_per_image
        batch = processor(PROMPT, [img])
        ids = batch["input_ids"][0].tolist()
        assert ids.count(llava_tests.IMAGE_TOKEN) == model.tokens_per_image
        want = generate(model, batch["input_ids"], pixel_values=batch["pixel_values"], max_new_tokens=5,
                        eos_ids=())[0].tolist()
        engine = Engine(model, block_size=4, num_blocks=64)
        rid = engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                                 pixel_values=batch["pixel_values"])
        out = None
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished and o.request_id == rid:
                    out = list(o.outputs[0].token_ids)
        assert out == want and len(want) == 5
    finally:
        model.visual_token_merge = 1.0
        processor.tokens_per_image = n
    with torch.inference_mode():
        assert torch.equal(model.image_features(pixels()), full)  # off again: all tokens, as before


def test_llava_merging_errors(llava):
    model, _ = llava
    try:
        model.visual_token_merge, model.visual_token_fraction = 0.5, 0.5
        with pytest.raises(LmforgeError, match="two budgets for the same image tokens"):
            model.tokens_per_image
        model.visual_token_fraction = 1.0
        model.visual_token_merge = 0.1  # 2 of 16: two blocks halve 16 patches to 4 at most
        with pytest.raises(LmforgeError, match=r"asks for 2 of 16 .* the fewest reachable is 4 of 16, "
                                               r"visual_token_merge >= 0\.25"):
            model.tokens_per_image
        for bad in (0.0, 1.5):
            model.visual_token_merge = bad
            with pytest.raises(LmforgeError, match=r"visual_token_merge must be in \(0, 1\]"):
                model.tokens_per_image
    finally:
        model.visual_token_merge, model.visual_token_fraction = 1.0, 1.0
    layers = LlavaForConditionalGeneration(model.config.replace(vision_feature_layer=[-3, -1]))
    layers.visual_token_merge = 0.5
    with pytest.raises(LmforgeError, match=r"one vision feature layer; this LLaVA concatenates \[-3, -1\]"):
        layers.tokens_per_image
    embeddings = LlavaForConditionalGeneration(model.config.replace(vision_feature_layer=0))
    embeddings.visual_token_merge = 0.5  # the features are the embeddings: no block runs before them
    with pytest.raises(LmforgeError, match=r"output of 0 block\(s\): the fewest reachable is 16 of 16"):
        embeddings.tokens_per_image
