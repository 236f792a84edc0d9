"""LLaVA (vision tower + projector + any decoder) against transformers on tiny random models (configs only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge import load_model, save_model
from lmforge.errors import ConfigError, LmforgeError
from lmforge.models import generate
from lmforge.models.llava import LlavaConfig, LlavaForConditionalGeneration
from lmforge.models.vision import VisionConfig

from .hf_factory import assert_in_memory_layout_loads, build_hf_model, write_word_tokenizer

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL")
from PIL import Image, ImageDraw

ATOL = 1e-4
VOCAB, IMAGE_TOKEN = 128, 127
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                   patch_size=8)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB)
# name -> (vision config class, text config class, vision_feature_layer, strategy)
VARIANTS = {
    "clip_llama": ("CLIPVisionConfig", "LlamaConfig", -2, "default"),
    "siglip_qwen2": ("SiglipVisionConfig", "Qwen2Config", -1, "full"),
    "clip_llama_layers": ("CLIPVisionConfig", "LlamaConfig", [-3, -1], "default"),
    "clip_llama_full": ("CLIPVisionConfig", "LlamaConfig", 1, "full"),  # transformers mishandles layer 0
    # Gemma: the embedding multiplier scales the tokens, not the spliced features; no final soft-cap in LLaVA
    "siglip_gemma2": ("SiglipVisionConfig", "Gemma2Config", -2, "full"),
}
TEXT_EXTRA = {"Gemma2Config": dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                   final_logit_softcapping=3.0)}


def build_hf_llava(name: str, seed: int = 0):
    vision_cls, text_cls, layer, strategy = VARIANTS[name]
    config = transformers.LlavaConfig(
        vision_config=getattr(transformers, vision_cls)(**TINY_VISION),
        text_config=getattr(transformers, text_cls)(**TINY_TEXT, **TEXT_EXTRA.get(text_cls, {})),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them so those paths count
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def image_batch(per_image: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 left-padded rows: one image, two images, no image (features fill placeholders row by row)."""
    g = torch.Generator().manual_seed(seed)
    length = 2 * per_image + 10
    ids = torch.randint(3, IMAGE_TOKEN, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.long)
    ids[0, 7:7 + per_image] = IMAGE_TOKEN
    ids[1, 3:3 + per_image] = IMAGE_TOKEN
    ids[1, 4 + per_image:4 + 2 * per_image] = IMAGE_TOKEN
    for row, pad in ((0, 5), (2, 11)):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    return ids, mask, pixels


def hf_logits(hf, ids, mask, pixels):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # generate() derives them from the mask; forward() does not
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions).logits


def masked_max_diff(a, b, mask):
    return ((a - b).abs() * mask[..., None]).max().item()


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build_hf_llava(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


def test_logits_match_with_left_padding(variant):
    name, hf, path = variant
    model = load_model(path)
    assert isinstance(model, LlavaForConditionalGeneration)
    per_image = model.config.num_image_tokens
    assert per_image == {"clip_llama": 16, "siglip_qwen2": 16, "clip_llama_layers": 16, "clip_llama_full": 17,
                         "siglip_gemma2": 16}[name]
    ids, mask, pixels = image_batch(per_image)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    ref = hf_logits(hf, ids, mask, pixels)
    diff = masked_max_diff(ours, ref, mask)
    print(f"{name}: max |dlogits| = {diff:.2e}")
    assert ours.shape == ref.shape == (3, ids.shape[1], VOCAB)
    assert diff <= ATOL, name
    # the images matter: other pixels change the logits after the placeholders (guards a no-op splice)
    with torch.no_grad():
        other = model(input_ids=ids, attention_mask=mask, pixel_values=pixels.flip(0))
    assert masked_max_diff(other, ours, mask) > 1e-3


def test_vision_tower_matches_transformers(variant):
    _, hf, path = variant
    model = load_model(path)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = model.vision_tower(pixels)
        ref = hf.model.vision_tower(pixel_values=pixels, output_hidden_states=True)
    assert len(ours.hidden_states) == len(ref.hidden_states) == TINY_VISION["num_hidden_layers"] + 1
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        assert (a - b).abs().max().item() <= 1e-5
    assert (ours.last_hidden_state - ref.last_hidden_state).abs().max().item() <= 1e-5
    assert (ours.pooled - ref.pooler_output).abs().max().item() <= 1e-5  # CLIP: class token; SigLIP: MAP head


def test_greedy_generate_matches_transformers(variant):
    name, hf, path = variant
    model = load_model(path)
    ids, mask, pixels = image_batch(model.config.num_image_tokens, seed=3)
    ours = generate(model, ids, mask, pixel_values=pixels, max_new_tokens=16, eos_ids=())
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=16,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    assert ours.shape == (3, 16)
    assert torch.equal(ours, ref), f"{name}: greedy tokens differ"


def test_sampled_generate_is_seeded(variant):
    _, _, path = variant
    model = load_model(path)
    ids, mask, pixels = image_batch(model.config.num_image_tokens, seed=4)
    a = generate(model, ids, mask, pixel_values=pixels, max_new_tokens=8, eos_ids=(), temperature=1.0, seed=5)
    b = generate(model, ids, mask, pixel_values=pixels, max_new_tokens=8, eos_ids=(), temperature=1.0, seed=5)
    assert torch.equal(a, b)


def test_save_roundtrip_loads_in_transformers(variant, tmp_path):
    _, hf, path = variant
    model = load_model(path)
    out = save_model(model, tmp_path / "saved")
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    # the hub layout, which every transformers version loads
    assert "language_model.model.embed_tokens.weight" in keys
    assert ("language_model.lm_head.weight" in keys) != model.config.text.tie_embeddings  # Gemma 2 ties
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert "multi_modal_projector.linear_1.weight" in keys
    reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref_state, got_state = hf.state_dict(), reloaded.eval().state_dict()
    assert ref_state.keys() == got_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], got_state[k]), k
    ids, mask, pixels = image_batch(model.config.num_image_tokens, seed=5)
    assert masked_max_diff(hf_logits(reloaded, ids, mask, pixels), hf_logits(hf, ids, mask, pixels), mask) == 0.0
    again = load_model(out)
    with torch.no_grad():
        assert torch.equal(again(ids, mask, pixel_values=pixels), model(ids, mask, pixel_values=pixels))
    assert LlavaConfig.from_hf(model.config.to_hf()) == model.config
    saved = LlavaConfig.from_hf(json.loads((out / "config.json").read_text()))
    assert saved.replace(hf_extra={}, text=saved.text.replace(hf_extra={})) == model.config.replace(
        hf_extra={}, text=model.config.text.replace(hf_extra={}))


def test_current_transformers_layout_loads(tmp_path):
    """transformers >= 4.52 keeps model.language_model.* / lm_head / model.vision_tower.* in memory: load that too."""
    assert_in_memory_layout_loads(build_hf_llava("clip_llama"), tmp_path)


def test_text_only_prompt_to_llava_matches_its_decoder(variant):
    _, hf, path = variant
    model = load_model(path)
    ids = torch.randint(3, IMAGE_TOKEN, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        ref = hf(input_ids=ids).logits
    assert (ours - ref).abs().max().item() <= ATOL
    with pytest.raises(LmforgeError, match="16 image placeholder tokens .* but no pixel_values"):
        model(torch.full((1, 16), IMAGE_TOKEN))


# ---- errors -------------------------------------------------------------------------------------------
def test_placeholder_count_mismatch_names_both_counts(variant):
    _, _, path = variant
    model = load_model(path)
    n = model.config.num_image_tokens
    ids, mask, pixels = image_batch(n)
    message = rf"{3 * n} image placeholder tokens .* for 2 image\(s\), which need {n} each"
    with pytest.raises(LmforgeError, match=message):
        model(ids, mask, pixel_values=pixels[:2])


def test_unsupported_vision_model_type_lists_supported(tmp_path):
    hf = build_hf_llava("clip_llama")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vision_config"]["model_type"] = "dinov2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    supported = "supported: clip_vision_model, siglip_vision_model"
    with pytest.raises(ConfigError, match=f"'dinov2' is not supported; {supported}"):
        load_model(tmp_path)
    with pytest.raises(ConfigError, match="supported: clip_vision_model"):
        VisionConfig.from_hf({"model_type": "pixtral"})


def test_image_to_text_only_model_is_refused(tmp_path):
    hf = build_hf_model("llama")
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    with pytest.raises(LmforgeError, match=r"text-only model \(llama\): it takes no images"):
        generate(model, torch.tensor([[5, 6, 7]]), pixel_values=torch.zeros(1, 3, 32, 32))


def test_bad_pixel_values_shape_is_named(variant):
    _, _, path = variant
    model = load_model(path)
    ids = torch.full((1, model.config.num_image_tokens), IMAGE_TOKEN)
    with pytest.raises(LmforgeError, match=r"pixel_values has shape \[1, 3, 64, 64\]; .* \[images, 3, 32, 32\]"):
        model(ids, pixel_values=torch.zeros(1, 3, 64, 64))


def test_llava_config_validation():
    hf = build_hf_llava("clip_llama")
    d = hf.config.to_dict()
    for change, message in (
        (dict(vision_feature_layer=4), r"vision_feature_layer \[4\] out of range: the vision tower has 4 hidden"),
        (dict(vision_feature_select_strategy="cls"), "vision_feature_select_strategy must be one of default, full"),
        (dict(image_token_index=500), "image_token_index 500 is outside the text vocabulary of 128"),
        (dict(projector_hidden_act="swiglu"), "projector_hidden_act 'swiglu' is not supported"),
    ):
        with pytest.raises(ConfigError, match=message):
            LlavaConfig.from_hf({**d, **change})
    bad_text = {**d, "text_config": {**d["text_config"], "model_type": "gpt2"}}
    with pytest.raises(ConfigError, match="text_config model_type 'gpt2' is not supported in a LLaVA"):
        LlavaConfig.from_hf(bad_text)


def test_sparse_llava15_text_config_gets_llama_defaults():
    """llava-1.5's config.json keeps only the text fields that differ from LlamaConfig's defaults."""
    d = {"model_type": "llava", "image_token_index": 32000, "text_config": {"model_type": "llama", "vocab_size": 32064},
         "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                           "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                           "patch_size": 14}}
    config = LlavaConfig.from_hf(d)
    assert (config.text.hidden_size, config.text.num_layers, config.text.vocab_size) == (4096, 32, 32064)
    assert config.num_image_tokens == 576  # (336 / 14)^2, class token dropped


# ---- image processor, processor, CLI --------------------------------------------------------------------
def drawn_images() -> list:
    """Pillow drawings of several sizes (smaller than the crop too) and modes, transparency included."""
    images = []
    for i, (w, h) in enumerate([(37, 53), (64, 64), (200, 120), (20, 15), (33, 90)]):
        img = Image.new("RGB", (w, h), (20 * i, 200 - 30 * i, 90))
        draw = ImageDraw.Draw(img)
        draw.ellipse((w // 5, h // 6, w - 3, h // 2 + 4), fill=(250, 30 + 40 * i, 10))
        draw.line((0, h - 1, w - 1, 0), fill=(0, 0, 255), width=3)
        draw.rectangle((1, h // 2, w // 3, h - 2), fill=(255, 255, 0))
        images.append(img)
    rgba = images[0].convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))  # varying transparency: composited onto white
    palette = images[2].convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    return images + [rgba, images[1].convert("L"), images[4].convert("L"), palette]


def hf_image_processor(kind: str):
    if kind == "clip":
        return transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_image_processor_matches_transformers(kind, tmp_path):
    from lmforge.data.image_processor import ImageProcessor

    ref_processor = hf_image_processor(kind)
    ref_processor.save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path)
    images = drawn_images()
    ref = ref_processor(images, return_tensors="np")["pixel_values"]
    got = ours(images).numpy()
    assert got.shape == ref.shape == (len(images), 3, 32, 32)
    assert np.abs(got - ref).max() == 0.0  # the same float32 operations in the same order: bit for bit
    assert np.abs(got[0] - got[5]).max() > 0.1  # transparency changed the RGBA variant


def write_tokenizer(path) -> None:
    words = ["[UNK]", "<pad>", "<s>", "</s>", "USER:", "ASSISTANT:", "what", "is", "this", "?", "hi"]
    template = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    write_word_tokenizer(path, words, IMAGE_TOKEN, "<image>", template)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_full")
    hf = build_hf_llava("clip_llama")
    hf.save_pretrained(path)
    hf_image_processor("clip").save_pretrained(path)
    write_tokenizer(path)
    return hf, path


def test_processor_matches_transformers_llava_processor(llava_dir):
    from lmforge.data.image_processor import load_processor

    hf, path = llava_dir
    ours = load_processor(path)
    ref = transformers.LlavaProcessor(
        image_processor=hf_image_processor("clip"),
        tokenizer=transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json")),
        patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    images = drawn_images()[:2]
    text = "USER: <image> what is this ? <image> hi ASSISTANT:"
    got = ours(text, images)
    want = ref(text=text, images=images, return_tensors="pt")
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert (got["input_ids"] == IMAGE_TOKEN).sum() == 32
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    # and the model runs on it like transformers' class
    with torch.no_grad():
        assert (load_model(path)(**got) - hf(**want).logits).abs().max() <= ATOL


def test_processor_chat_messages_and_left_padding(llava_dir):
    from lmforge.data.image_processor import load_processor

    _, path = llava_dir
    processor = load_processor(path)
    images = drawn_images()[:3]
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what is this ?"}]}],
             [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": " hi"}]}]]
    batch = processor.apply_chat_template(chats, images=images)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 2 and (ids == IMAGE_TOKEN).sum(-1).tolist() == [16, 32]
    # "USER: <image>x16 what is this ? ASSISTANT:" is 22 tokens, the other chat 35: 13 of left padding
    assert mask[0].tolist() == [0] * 13 + [1] * 22 and mask[1].all()
    first = processor("USER: <image> what is this ? ASSISTANT:", images[0], add_special_tokens=False)
    assert first["input_ids"][0].tolist() == ids[0][mask[0].bool()].tolist()
    model = load_model(path)
    out = generate(model, ids, mask, pixel_values=batch["pixel_values"], max_new_tokens=4, eos_ids=())
    assert out.shape == (2, 4)


def test_processor_placeholder_count_mismatch_names_both_counts(llava_dir):
    from lmforge.data.image_processor import load_processor

    _, path = llava_dir
    processor = load_processor(path)
    image = drawn_images()[0]
    with pytest.raises(LmforgeError, match=r"the text has 2 image placeholder\(s\) \('<image>'\) but 1 image\(s\)"):
        processor("USER: <image> <image> hi", [image])
    with pytest.raises(LmforgeError, match=r"the text has 0 image placeholder\(s\) .* but 1 image\(s\)"):
        processor.apply_chat_template([{"role": "user", "content": "hi"}], images=[image])


def test_corrupt_image_file_is_named(tmp_path):
    from lmforge.data.image_processor import load_image

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    drawn_images()[2].save(tmp_path / "ok.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:200])
    for bad in (garbage, truncated):
        with pytest.raises(LmforgeError, match=f"cannot read image file {bad}"):
            load_image(bad)
    with pytest.raises(LmforgeError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    assert load_image(tmp_path / "ok.png").size == (200, 120)


def test_cli_generate_with_image(llava_dir, tmp_path, capsys):
    from lmforge.cli import main

    _, path = llava_dir
    drawn_images()[0].save(tmp_path / "cat.png")
    args = ["generate", "--model", str(path), "--max-new-tokens", "4", "--image", str(tmp_path / "cat.png")]
    assert main([*args, "--prompt", "USER: <image> what is this ? ASSISTANT:"]) == 0
    assert main([*args, "--prompt", "what is this ?", "--chat"]) == 0
    capsys.readouterr()
    assert main([*args, "--prompt", "USER: hi ASSISTANT:"]) == 2
    assert "the text has 0 image placeholder(s) ('<image>') but 1 image(s)" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    bad = ["generate", "--model", str(path), "--prompt", "<image>", "--image", str(tmp_path / "bad.png")]
    assert main(bad) == 2
    assert "cannot read image file" in capsys.readouterr().err


def test_cli_chat_prompt_places_the_image_itself(llava_dir, tmp_path, capsys):
    """--chat with the placeholder in the prompt keeps it there (question first), as the chat message with the
    image part after the text would."""
    from lmforge.cli import main
    from lmforge.data.image_processor import load_processor

    _, path = llava_dir
    image = drawn_images()[1]
    image.save(tmp_path / "cat.png")
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--max-new-tokens", "4", "--image", str(tmp_path / "cat.png"),
                 "--chat", "--prompt", "what is this ? <image>"]) == 0
    printed = capsys.readouterr().out
    processor, model = load_processor(path), load_model(path)
    chat = [{"role": "user", "content": [{"type": "text", "text": "what is this ? "}, {"type": "image"}]}]
    batch = processor.apply_chat_template(chat, images=[image])
    assert batch["input_ids"][0, -1] != IMAGE_TOKEN  # the template's assistant prompt follows the image
    out = generate(model, batch.pop("input_ids"), batch.pop("attention_mask"), max_new_tokens=4, **batch)
    assert processor.decode(out[0].tolist()).strip() in printed


def test_cli_image_to_text_only_model(tmp_path, capsys):
    from lmforge.cli import main

    build_hf_model("llama").save_pretrained(tmp_path / "m")
    write_tokenizer(tmp_path / "m")
    drawn_images()[0].save(tmp_path / "cat.png")
    rc = main(["generate", "--model", str(tmp_path / "m"), "--prompt", "<image> hi", "--image",
               str(tmp_path / "cat.png")])
    assert rc == 2
    assert "--image needs a vision-language model (model_type llava or mllama)" in capsys.readouterr().err
