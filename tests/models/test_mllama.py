"""Llama 3.2 Vision (tiled ViT + gated cross-attention decoder) against transformers on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge import load_model, save_model
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.models import generate
from lmforge.models.mllama import MllamaConfig, MllamaForConditionalGeneration

from .hf_factory import assert_in_memory_layout_loads, write_word_tokenizer

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL")
from PIL import Image, ImageDraw

ATOL = 1e-4
VOCAB, IMAGE_TOKEN, TILE, TILES = 128, 128, 16, 4  # <|image|> is the first of the 8 ids past the LM head's vocabulary
CROSS_LAYERS = [1, 3]
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2, attention_heads=4,
                   image_size=TILE, patch_size=8, max_num_tiles=TILES, intermediate_layers_indices=[0, 2],
                   vision_output_dim=32 * 3)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB, cross_attention_layers=CROSS_LAYERS, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def build_hf_mllama(seed: int = 0, **text_changes):
    config = transformers.MllamaConfig(vision_config=transformers.MllamaVisionConfig(**TINY_VISION),
                                       text_config=transformers.MllamaTextConfig(**{**TINY_TEXT, **text_changes}),
                                       image_token_index=IMAGE_TOKEN)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():  # the gates start at zero (the cross layers would be no-ops): give every path weight
        for name, p in model.named_parameters():
            if "gate" in name:
                p.copy_(torch.randn_like(p))
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def image_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """3 left-padded rows: two images (4 tiles, then 1 of a 1x1 arrangement), one image (2 tiles), no image.
    Tokens before a row's first image token see nothing (transformers' "full text row masked"), and row 1 has
    three more rows masked out after its image."""
    g = torch.Generator().manual_seed(seed)
    length = 14
    ids = torch.randint(3, VOCAB, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.long)
    for row, pad in ((1, 3), (2, 5)):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    ids[0, 2], ids[0, 7], ids[1, 4] = IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN
    cross = torch.zeros(3, length, 2, TILES, dtype=torch.long)
    cross[0, 2:7, 0, :4] = 1
    cross[0, 7:, 1, :1] = 1
    cross[1, 4:, 0, :2] = 1
    cross[1, 8:11] = 0
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 2, TILES, 3, TILE, TILE, generator=g),
                aspect_ratio_ids=torch.tensor([[6, 1], [2, 0], [0, 0]]),  # 2x2, 1x1 | 1x2 | none
                aspect_ratio_mask=torch.tensor([[[1, 1, 1, 1], [1, 0, 0, 0]], [[1, 1, 0, 0], [1, 0, 0, 0]],
                                                [[1, 0, 0, 0], [1, 0, 0, 0]]]),
                cross_attention_mask=cross)


def hf_logits(hf, batch):
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # generate() derives them; forward() not
    with torch.no_grad():
        return hf(**batch, position_ids=positions).logits


def masked_max_diff(a, b, mask):
    return ((a - b).abs() * mask[..., None]).max().item()


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    path = tmp_path_factory.mktemp("mllama")
    hf = build_hf_mllama()
    hf.save_pretrained(path)
    return hf, path, load_model(path)


def test_logits_match_with_left_padding_tiles_and_masked_rows(mllama):
    hf, _, model = mllama
    assert isinstance(model, MllamaForConditionalGeneration)
    batch = image_batch()
    with torch.no_grad():
        ours = model(**batch)
    ref = hf_logits(hf, batch)
    diff = masked_max_diff(ours, ref, batch["attention_mask"])
    print(f"mllama padded batch with images: max |dlogits| = {diff:.2e}")
    assert ours.shape == ref.shape == (3, 14, VOCAB)
    assert diff <= ATOL
    # the images matter, also to text rows that see none (they attend to every image token, as transformers' do)
    with torch.no_grad():
        other = model(**{**batch, "pixel_values": batch["pixel_values"].roll(1, 0)})
    changed = (other - ours).abs().amax(-1)
    assert changed[0, 8:].min() > 1e-4 and changed[1, 8:11].min() > 1e-4 and changed[0, :2].min() > 1e-4


def test_vision_encoder_matches_transformers(mllama):
    hf, _, model = mllama
    batch = image_batch(seed=1)
    args = (batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
    with torch.no_grad():
        ours = model.vision_model(*args)
        ref = hf.model.vision_model(*args).last_hidden_state
    assert ours.shape == (3, 2, TILES, 5, 96)  # 2x2 patches + class token; hidden * (1 + 2 intermediate layers)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_without_cross_attention_mask_and_text_only(mllama):
    hf, _, model = mllama
    batch = image_batch(seed=2)
    batch.pop("cross_attention_mask")  # every token sees every image token
    with torch.no_grad():
        diff = masked_max_diff(model(**batch), hf_logits(hf, batch), batch["attention_mask"])
        print(f"mllama without cross_attention_mask: max |dlogits| = {diff:.2e}")
        assert diff <= ATOL
        text = {k: batch[k] for k in ("input_ids", "attention_mask")}  # no images: the cross layers are skipped
        diff = masked_max_diff(model(**text), hf_logits(hf, text), text["attention_mask"])
        print(f"mllama text only: max |dlogits| = {diff:.2e}")
        assert diff <= ATOL


def test_greedy_generate_matches_transformers(mllama):
    hf, _, model = mllama
    batch = image_batch(seed=3)
    ours = generate(model, **batch, max_new_tokens=12, eos_ids=())
    with torch.no_grad():
        ref = hf.generate(**batch, max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[:, batch["input_ids"].shape[1]:]
    assert ours.shape == (3, 12)
    assert torch.equal(ours, ref)
    text = {k: batch[k] for k in ("input_ids", "attention_mask")}
    ours = generate(model, **text, max_new_tokens=6, eos_ids=())
    with torch.no_grad():
        ref = hf.generate(**text, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 14:]
    assert torch.equal(ours, ref)


def test_cached_decoding_equals_one_forward(mllama):
    """Prefill with the images, then one token at a time from the cache: the image keys/values are computed once
    and kept; each step passes its own cross_attention_mask rows."""
    _, _, model = mllama
    batch = image_batch(seed=4)
    prompt = {k: v[:, :10] if k in ("input_ids", "attention_mask", "cross_attention_mask") else v
              for k, v in batch.items()}
    with torch.no_grad():
        full = model(**batch)
        cache = model.new_cache(3, 16)
        steps = [model(**prompt, cache=cache)]
        assert set(cache.cross_attention.cached) == set(CROSS_LAYERS) and cache.cross_attention.states is None
        for i in range(10, 14):
            steps.append(model(batch["input_ids"][:, i:i + 1], batch["attention_mask"][:, :i + 1][:, -1:],
                               cross_attention_mask=batch["cross_attention_mask"][:, i:i + 1], cache=cache))
    diff = masked_max_diff(torch.cat(steps, 1), full, batch["attention_mask"])
    assert diff <= 1e-5


def test_save_roundtrip_loads_in_transformers(mllama, tmp_path):
    hf, _, model = mllama
    out = save_model(model, tmp_path / "saved")
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
            "language_model.model.layers.1.cross_attn_attn_gate", "vision_model.class_embedding",
            "multi_modal_projector.weight"} <= keys
    reloaded, info = transformers.MllamaForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref_state, got_state = hf.state_dict(), reloaded.eval().state_dict()
    assert ref_state.keys() == got_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], got_state[k]), k
    batch = image_batch(seed=5)
    assert masked_max_diff(hf_logits(reloaded, batch), hf_logits(hf, batch), batch["attention_mask"]) == 0.0
    again = load_model(out)
    with torch.no_grad():
        assert torch.equal(again(**batch), model(**batch))
    assert MllamaConfig.from_hf(model.config.to_hf()) == model.config
    saved = MllamaConfig.from_hf(json.loads((out / "config.json").read_text()))
    assert saved.replace(hf_extra={}) == model.config.replace(hf_extra={})  # save_model adds the dtype fields


def test_in_memory_layout_loads(tmp_path):
    """transformers keeps model.language_model.* / model.vision_model.* / lm_head in memory: load that too."""
    assert_in_memory_layout_loads(build_hf_mllama(), tmp_path)


def test_parameter_count_and_hooks(mllama):
    _, _, model = mllama
    decoder = model.language_model
    assert decoder.config.num_params() == sum(p.numel() for p in decoder.parameters())
    names = decoder.hook_names()
    assert "blocks.1.attn.hook_k" in names and "blocks.1.hook_attn_out" in names and "blocks.0.attn.hook_rot_q" in names
    seen = {}
    batch = image_batch(seed=6)
    with torch.no_grad():
        plain = model(**batch)
        zeroed = model(**batch, hooks={"blocks.3.hook_attn_out": lambda x, name: seen.setdefault(name, x) * 0})
    assert seen["blocks.3.hook_attn_out"].shape == (3, 14, 64)
    assert masked_max_diff(zeroed, plain, batch["attention_mask"]) > 1e-4


# ---- errors -------------------------------------------------------------------------------------------------
def test_mismatched_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = build_hf_mllama()
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    wrong = {**cfg, "text_config": {**cfg["text_config"], "cross_attention_layers": [1, 2]}}
    (tmp_path / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError, match=r"cross_attention_layers=\[1, 2\], but the weights hold cross-attention "
                                              r"layers \[1, 3\]"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = load_file(tmp_path / "model.safetensors")
    del weights["vision_model.global_transformer.layers.1.gate_ffn"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor vision_model.global_transformer.layers.1.gate_ffn "
                                              r"\(needed for mllama with a 4-layer decoder"):
        load_model(tmp_path)
    tied = {**cfg, "text_config": {**cfg["text_config"], "tie_word_embeddings": True}}  # transformers never ties
    config = MllamaConfig.from_hf(tied)
    assert not config.text.tie_embeddings and config.to_hf()["text_config"]["tie_word_embeddings"] is True
    bad_dim = {**cfg, "vision_config": {**cfg["vision_config"], "vision_output_dim": 64}}
    (tmp_path / "config.json").write_text(json.dumps(bad_dim))
    with pytest.raises(ConfigError, match=r"vision_output_dim=64, but the encoder outputs .* = 96"):
        load_model(tmp_path)


def test_bad_inputs_are_named(mllama):
    _, _, model = mllama
    batch = image_batch()
    with pytest.raises(LmforgeError, match="pixel_values need aspect_ratio_ids and aspect_ratio_mask"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"])
    with pytest.raises(LmforgeError, match=r"pixel_values has shape \[3, 2, 4, 3, 32, 32\]; .* tiles of 16x16"):
        model(**{**batch, "pixel_values": torch.zeros(3, 2, 4, 3, 32, 32)})
    with pytest.raises(LmforgeError, match=r"cross_attention_mask has shape \[3, 14, 1, 4\]; .* 2 image\(s\)"):
        model(**{**batch, "cross_attention_mask": batch["cross_attention_mask"][:, :, :1]})
    with pytest.raises(LmforgeError, match=r"aspect_ratio_ids must be in 0..8"):
        model(**{**batch, "aspect_ratio_ids": torch.full((3, 2), 9)})


# ---- image processor and processor ----------------------------------------------------------------------------
def drawn_images() -> list:
    """Pillow drawings of several sizes and aspect ratios (tall, wide, tiny, larger than all tiles), and modes."""
    images = []
    for i, (w, h) in enumerate([(37, 53), (64, 16), (20, 15), (90, 33), (16, 70), (40, 40)]):
        img = Image.new("RGB", (w, h), (20 * i, 200 - 30 * i, 90))
        draw = ImageDraw.Draw(img)
        draw.ellipse((w // 5, h // 6, w - 3, h // 2 + 4), fill=(250, 30 + 40 * i, 10))
        draw.line((0, h - 1, w - 1, 0), fill=(0, 0, 255), width=3)
        images.append(img)
    rgba = images[0].convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    return images + [rgba, images[3].convert("L")]


def hf_image_processor():
    return transformers.MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=TILES)


def test_image_processor_matches_transformers(tmp_path):
    from lmforge.data.image_processor import MllamaImageProcessor

    ref_processor = hf_image_processor()
    ref_processor.save_pretrained(tmp_path)
    ours = MllamaImageProcessor.from_pretrained(tmp_path)
    images = drawn_images()
    rows = [images[:3], images[3:4], images[4:]]
    ref = ref_processor(rows, return_tensors="np")
    got = ours(rows)
    assert got["pixel_values"].shape == ref["pixel_values"].shape == (3, 4, TILES, 3, TILE, TILE)
    assert np.abs(got["pixel_values"].numpy() - ref["pixel_values"]).max() == 0.0  # bit for bit
    assert got["aspect_ratio_ids"].tolist() == ref["aspect_ratio_ids"].tolist()
    assert got["aspect_ratio_mask"].tolist() == ref["aspect_ratio_mask"].tolist()
    assert len(set(got["aspect_ratio_ids"].flatten().tolist())) >= 4  # several arrangements were exercised


def write_tokenizer(path) -> None:
    words = ["<pad>", "<s>", "</s>", "[UNK]", "what", "is", "this", "?", "hi", "and", "USER:", "ASSISTANT:"]
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    write_word_tokenizer(path, words, VOCAB, "<|image|>", template)


@pytest.fixture(scope="module")
def mllama_dir(mllama):
    hf, path, model = mllama
    hf_image_processor().save_pretrained(path)
    write_tokenizer(path)
    return hf, path, model


def test_processor_matches_transformers_processor(mllama_dir):
    from lmforge.data.image_processor import MllamaProcessor, load_processor

    hf, path, model = mllama_dir
    ours = load_processor(path)
    assert isinstance(ours, MllamaProcessor)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>",
                                                     pad_token="<pad>", padding_side="left")
    ref_processor = transformers.MllamaProcessor(image_processor=hf_image_processor(), tokenizer=tokenizer)
    images = drawn_images()
    texts = ["<|image|> what is this ? <|image|> and this ?", "hi <|image|> <|image|> what ?", "hi what is this ?"]
    got = ours(texts, images[:4])
    want = ref_processor(text=texts, images=[images[:2], images[2:4], []], padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "cross_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert got[key].tolist() == want[key].tolist(), key
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    assert got["input_ids"][0, 0].item() == IMAGE_TOKEN and got["input_ids"][0, 1].item() == 1  # <s> after it
    with torch.no_grad():  # and the model runs on it like transformers' class
        diff = masked_max_diff(model(**got), hf_logits(hf, dict(want)), got["attention_mask"])
    print(f"mllama on processor output: max |dlogits| = {diff:.2e}")
    assert diff <= ATOL
    out = generate(model, **got, max_new_tokens=4, eos_ids=())
    assert out.shape == (3, 4)


def test_processor_chat_messages_and_count_mismatch(mllama_dir):
    from lmforge.data.image_processor import load_processor

    _, path, _ = mllama_dir
    processor = load_processor(path)
    images = drawn_images()[:2]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what is this ?"}]}]
    batch = processor.apply_chat_template([chat, chat], images=images)
    assert batch["pixel_values"].shape == (2, 1, TILES, 3, TILE, TILE)
    ids = batch["input_ids"][0].tolist()
    assert ids[:3] == [1, 10, IMAGE_TOKEN]  # <s> USER: <|image|>
    assert batch["cross_attention_mask"][0, :2].sum() == 0 and batch["cross_attention_mask"][0, 2:, 0, 0].all()
    with pytest.raises(LmforgeError, match=r"the text has 2 image placeholder\(s\) \('<\|image\|>'\) but 1 image"):
        processor("<|image|> hi <|image|>", images[:1])


def test_cli_generate_with_image(mllama_dir, tmp_path, capsys):
    """`lmforge generate --image` on a Llama 3.2 Vision directory: the processor's aspect-ratio tensors and
    cross-attention mask reach the model; the printed reply is what `generate` gives on the same inputs."""
    from lmforge.cli import main
    from lmforge.data.image_processor import load_processor
    from lmforge.data.tokenizer import load_tokenizer

    _, path, model = mllama_dir
    drawn_images()[0].save(tmp_path / "cat.png")
    assert main(["generate", "--model", str(path), "--max-new-tokens", "5", "--image", str(tmp_path / "cat.png"),
                 "--prompt", "<|image|> what is this ?"]) == 0
    printed = capsys.readouterr().out
    batch = load_processor(path)("<|image|> what is this ?", [drawn_images()[0]])
    expected = generate(model, **batch, max_new_tokens=5)
    text = load_tokenizer(path).decode(expected[0].tolist())
    assert text.strip() and text.strip() in printed


def test_null_special_token_ids_stay_null():
    """transformers keeps a null bos/eos/pad id; filling in Llama 3.2's (128000...) would name tokens that another
    vocabulary does not have."""
    from lmforge.models.mllama import MllamaConfig

    hf = build_hf_mllama().config.to_dict()
    hf["text_config"].update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    text = MllamaConfig.from_hf(hf).text
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (None, None, None)
    assert MllamaConfig.from_hf(MllamaConfig.from_hf(hf).to_hf()).text.eos_token_id is None
