"""FastV token pruning in the decoder (``TokenPruning``; LLaVA's ``fastv_layer`` / ``fastv_keep``): the ranking is
the explicit attention pattern's last row, the kept tokens run on at their own positions exactly as a forward of
only those tokens would, left-padded batches with different image counts prune row by row, and generation from the
pruned cache equals recomputing the whole sequence with the same tokens kept."""

from __future__ import annotations

import pytest
import torch

from lmforge import load_model
from lmforge.engine import Engine
from lmforge.errors import LmforgeError
from lmforge.models.generate import generate
from lmforge.models.model import ContiguousStep, ForwardContext, TokenPruning

from . import test_llava as llava_tests

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return load_model(tiny_llava_dir)


@pytest.fixture(scope="module")
def gemma_llava(tmp_path_factory):
    """A SigLIP + Gemma 2 LLaVA: soft-capped attention, and a sliding window (6) that bites on these prompts."""
    path = tmp_path_factory.mktemp("fastv_gemma")
    llava_tests.build_hf_llava("siglip_gemma2").save_pretrained(path)
    return load_model(path)


@pytest.fixture
def fastv(llava):
    def set_keep(keep: float, layer: int = 1):
        llava.fastv_layer, llava.fastv_keep = layer, keep
        return llava

    yield set_keep
    llava.fastv_layer, llava.fastv_keep = 2, 1.0


def batch(model):
    ids, mask, pixels = llava_tests.image_batch(model.config.num_image_tokens)
    return ids, mask, pixels


class KeptTokensStep(ContiguousStep):
    """Attention over the kept tokens alone, causal and windowed by their original positions (what a sliding window
    means: the distance between positions, not between kept tokens)."""

    def __init__(self, positions: torch.Tensor) -> None:
        super().__init__(positions, torch.ones_like(positions, dtype=torch.bool), 0, positions.shape[1], False)

    def context(self, attn, k, v, layer):
        pos = self.positions[0]
        allowed = pos[None, :] <= pos[:, None]
        if attn.window is not None:
            allowed = allowed & (pos[:, None] - pos[None, :] < attn.window)
        return k, v, allowed[None, None]


def pruned_by_hand(model, embeds: torch.Tensor, ids: torch.Tensor, layer: int, keep: float) -> torch.Tensor:
    """Last-token logits of one unpadded row: block ``layer - 1``'s explicit attention pattern (its last row,
    heads averaged) picks the image tokens; blocks from ``layer`` on run on the kept tokens alone."""
    text = model.language_model
    seen = {}

    def grab(x, name):
        seen[name] = x

    pattern, resid = f"blocks.{layer - 1}.attn.hook_pattern", f"blocks.{layer}.hook_resid_pre"
    with torch.no_grad():
        text(inputs_embeds=embeds[None], hooks={pattern: grab, resid: grab})
        candidates = ids == model.config.image_token_id
        scores = seen[pattern][0, :, -1, :].mean(0)
        n = int(candidates.sum())
        kept = ~candidates
        if n:
            # ties (e.g. every image token outside a sliding window: all zero) go to the earlier tokens
            order = scores.masked_fill(~candidates, float("-inf")).argsort(descending=True, stable=True)
            top = order[:max(1, round(n * keep))]
            kept[top] = True
        x = seen[resid][:, kept]
        positions = torch.arange(len(ids))[kept][None]
        cos, sin = text._rope(positions, x.dtype)
        ctx = ForwardContext(KeptTokensStep(positions), None, False)
        for block in text.model.layers[layer:]:
            x = block(x, cos, sin, ctx)
        return text.unembed(text.model.norm(x[:, -1]))[0], int(kept.sum())


@pytest.mark.parametrize("family", ["clip_llama", "siglip_gemma2"])
@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_pruned_forward_equals_the_kept_tokens_run_alone(llava, gemma_llava, family, keep):
    llava = llava if family == "clip_llama" else gemma_llava
    ids, mask, pixels = batch(llava)
    with torch.no_grad():
        full = llava(ids, mask, pixel_values=pixels)[:, -1]
        embeds = llava.embed(ids, pixels)
        llava.fastv_layer, llava.fastv_keep = 1, keep
        try:
            ours = llava(ids, mask, pixel_values=pixels)[:, -1]
        finally:
            llava.fastv_layer, llava.fastv_keep = 2, 1.0
    for row in range(ids.shape[0]):  # one image, two images (more candidates, fewer kept), none (nothing pruned)
        real = mask[row].bool()
        want, n_kept = pruned_by_hand(llava, embeds[row, real], ids[row, real], 1, keep)
        assert (ours[row] - want).abs().max().item() < 1e-5
        images = int((ids[row] == llava.config.image_token_id).sum())
        if images:
            assert n_kept < int(real.sum())
            assert (ours[row] - full[row]).abs().max().item() > 1e-4  # pruning really changed the row
        else:
            assert (ours[row] - full[row]).abs().max().item() < 1e-5


def test_generation_from_the_pruned_cache_equals_recomputing_with_the_same_tokens_kept(llava, fastv, monkeypatch):
    ids, mask, pixels = batch(llava)
    model = fastv(0.25)
    want = generate(model, ids, mask, pixel_values=pixels, max_new_tokens=6, eos_ids=())
    first: list[torch.Tensor] = []
    observe = TokenPruning.observe

    def ranked_at_the_prefill(self, attn, q, k, valid):  # later calls keep the prompt's ranking
        if not first:
            observe(self, attn, q, k, valid)
            first.append(self.scores)
        else:
            extra = q.shape[2] - first[0].shape[1]
            self.scores = torch.cat([first[0], torch.zeros(first[0].shape[0], extra)], dim=1)

    monkeypatch.setattr(TokenPruning, "observe", ranked_at_the_prefill)
    seq, m = ids, mask
    got = []
    with torch.no_grad():
        for _ in range(6):
            token = model(seq, m, pixel_values=pixels)[:, -1].argmax(-1)
            got.append(token)
            seq = torch.cat([seq, token[:, None]], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    assert torch.equal(torch.stack(got, 1), want)


def test_fastv_errors(llava, fastv):
    ids, mask, pixels = batch(llava)
    with pytest.raises(LmforgeError, match=r"layer must be in 1\.\.1"):
        fastv(0.5, layer=2)(ids, mask, pixel_values=pixels)
    with pytest.raises(LmforgeError, match=r"share in \(0, 1\]"):
        fastv(0.0)(ids, mask, pixel_values=pixels)
    model = fastv(0.5)
    engine = Engine(model, block_size=4, num_blocks=64)
    row = ids[0][mask[0].bool()].tolist()
    with pytest.raises(LmforgeError, match="FastV pruning .* does not run in the paged engine"):
        engine.add_request(row, pixel_values=pixels[:1])
    cache = model.new_cache(3, 64)
    model.language_model(ids[:, :3], mask[:, :3], cache=cache)
    with pytest.raises(LmforgeError, match="prefill from an empty"):
        model(ids, mask, pixel_values=pixels, cache=cache)


@pytest.mark.parametrize("spec", ["fastv:0.5@1", "hired:0.25", "tome:0.5"])
def test_cli_generate_with_visual_tokens(tiny_llava_dir, tmp_path, capsys, spec):
    """`lmforge generate --image --visual-tokens SPEC` prints what `generate` gives the model with that switch."""
    from lmforge.cli import main
    from lmforge.data.image_processor import load_processor
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.llava import set_visual_tokens

    path = tiny_llava_dir
    image = llava_tests.drawn_images()[0]
    image.save(tmp_path / "cat.png")
    prompt = "USER: <image> what is this ? ASSISTANT:"
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--max-new-tokens", "5", "--image", str(tmp_path / "cat.png"),
                 "--visual-tokens", spec, "--prompt", prompt]) == 0
    printed = capsys.readouterr().out
    model, processor = load_model(path), load_processor(path)
    set_visual_tokens(model, spec, processor)
    batch = processor(prompt, [image])
    assert (batch["input_ids"] == model.config.image_token_id).sum() == model.tokens_per_image
    text = load_tokenizer(path).decode(generate(model, **batch, max_new_tokens=5)[0].tolist())
    assert text.strip() and text.strip() in printed


def test_visual_tokens_spec_errors(llava):
    from lmforge.models.llava import set_visual_tokens

    for spec, message in [("fast:0.5", "expected METHOD:SHARE"), ("hired", "expected METHOD:SHARE"),
                          ("hired:half", "must be a number"), ("hired:1.5", r"in \(0, 1\]"),
                          ("hired:0.5@2", "'@LAYER' is FastV's"), ("fastv:0.5@2", r"block in 1\.\.1")]:
        with pytest.raises(LmforgeError, match=message):
            set_visual_tokens(llava, spec)
    text = llava.language_model
    with pytest.raises(LmforgeError, match="needs a LLaVA-style model"):
        set_visual_tokens(text, "hired:0.5")
    assert (llava.visual_token_fraction, llava.fastv_keep) == (1.0, 1.0)  # nothing was set by a refused spec
