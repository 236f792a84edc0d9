"""Vision-language models composed from a trained text decoder (``lmforge.models.compose``): the decoder's text
behaviour is kept exactly, the saved directories load in lmforge and transformers alike, and ``lmforge build-vlm``
goes from a decoder directory to a model + processor that take a PIL image. Tiny sizes, nothing downloaded."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge import load_model
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.models.mllama import tile_arrangements
from lmforge.models.compose import (
    compose_llava,
    compose_mllama,
    cross_attention_positions,
    image_processor_config,
    init_vision_weights,
    parameter_counts,
    save_composed,
)
from lmforge.models.config import Config
from lmforge.models.llava import LlavaForConditionalGeneration
from lmforge.models.mllama import MllamaForConditionalGeneration
from lmforge.models.model import CrossAttentionBlock, Transformer

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")
from PIL import Image, ImageDraw

ATOL = 1e-4
V = 96  # the decoder's vocabulary (and its tokenizer's: the image token is new)
WORDS = ["<pad>", "<s>", "</s>", "[UNK]", "a", "cat", "dog", "sits", "on", "the", "mat", "what", "is", "this", "?"]
TINY_DECODER = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=1,
                    eos_token_id=2, pad_token_id=0)
# small new parts: 16px images (tiles) of 8px patches -> 4 patches (+ a class token)
TINY_VISION = dict(image_size=16, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=4)
TINY_FLAGS = ["--image-size", "16", "--patch-size", "8", "--vision-hidden", "32", "--vision-layers", "2"]


def write_tokenizer(path, size: int = V) -> None:
    """A word-level tokenizer of exactly ``size`` tokens (specials first), without any image token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS + [f"w{i}" for i in range(len(WORDS), size)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast",
         "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}))


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """A trained-looking tiny Llama (tied embeddings, perturbed norms) with its tokenizer, as transformers saves it."""
    path = tmp_path_factory.mktemp("decoder")
    config = transformers.LlamaConfig(**TINY_DECODER)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path)
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def decoder(decoder_dir):
    model = load_model(decoder_dir)
    assert isinstance(model, Transformer) and model.config.tie_embeddings
    return model


def text_batch(seed: int = 0, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :4], ids[1, :4] = 0, 0  # left padding
    return ids, mask


def mllama_images(batch: int, tiles: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(pixel_values=torch.randn(batch, 1, tiles, 3, 16, 16, generator=g),
                aspect_ratio_ids=torch.ones(batch, 1, dtype=torch.long),  # 1x1: one real tile
                aspect_ratio_mask=torch.tensor([[[1] + [0] * (tiles - 1)]] * batch))


def masked_max_diff(a, b, mask):
    return ((a - b).abs() * mask[..., None]).max().item()


def hf_positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' forward() does not derive them from the mask


# ---- Method A: LLaVA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_token_id", [V - 1, V], ids=["existing-id", "grows-vocab"])
def test_llava_text_only_logits_equal_the_decoder(decoder, image_token_id):
    model = compose_llava(decoder, image_token_id=image_token_id, **TINY_VISION)
    assert isinstance(model, LlavaForConditionalGeneration)
    ids, mask = text_batch()
    ids[ids == image_token_id] = 5  # text only: no placeholders
    with torch.no_grad():
        ours, ref = model(ids, mask), decoder(ids, mask)
    assert ours.shape[-1] == max(V, image_token_id + 1)
    assert torch.equal(ours[..., :V], ref)


def test_llava_vocabulary_growth_and_copy(decoder):
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    model = compose_llava(decoder, image_token_id=V + 2, **TINY_VISION)
    text = model.language_model
    assert model.config.text.vocab_size == text.config.vocab_size == V + 3 and decoder.config.vocab_size == V
    embed = text.model.embed_tokens.weight
    assert embed.shape == (V + 3, 64) and text.lm_head.weight is embed  # still tied, as the decoder
    assert torch.equal(embed[:V], decoder.model.embed_tokens.weight)
    assert torch.allclose(embed[V:], decoder.model.embed_tokens.weight.mean(0).expand(3, -1))
    for name, value in decoder.state_dict().items():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(text.state_dict()[name], value), name
    with torch.no_grad():  # the copy does not share storage with the decoder
        text.model.norm.weight.add_(1.0)
        embed.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in decoder.state_dict().items())
    # CLIP: the class token is dropped ("default"), 2x2 patches stay; SigLIP keeps every token ("full")
    assert model.config.vision_feature_select_strategy == "default" and model.config.num_image_tokens == 4
    siglip = compose_llava(decoder, image_token_id=V, vision_family="siglip_vision_model", **TINY_VISION)
    assert siglip.config.vision_feature_select_strategy == "full" and siglip.config.num_image_tokens == 4
    assert siglip.vision_tower.head is None


def test_init_is_seeded_and_sensible(decoder):
    a = compose_llava(decoder, image_token_id=V, seed=0, **TINY_VISION)
    b = compose_llava(decoder, image_token_id=V, seed=0, **TINY_VISION)
    c = compose_llava(decoder, image_token_id=V, seed=1, **TINY_VISION)
    for name, value in a.vision_tower.state_dict().items():
        assert torch.equal(value, b.vision_tower.state_dict()[name]), name
    assert not torch.equal(a.vision_tower.patch_embed.weight, c.vision_tower.patch_embed.weight)
    tower = a.vision_tower
    assert torch.all(tower.pre_norm.weight == 1) and torch.all(tower.pre_norm.bias == 0)
    assert torch.all(tower.layers[0].attn.q_proj.bias == 0) and torch.all(a.multi_modal_projector.linear_1.bias == 0)
    weights = torch.cat([tower.layers[0].mlp.fc1.weight.flatten(), tower.position_embed.weight.flatten()])
    assert abs(weights.std().item() - 0.02) < 0.002
    assert 0.01 < tower.class_embed.std().item() < 0.03
    # the helper on its own: gates closed except a tiled ViT global layer's, RMSNorm to 1
    block = init_vision_weights(torch.nn.ModuleDict(dict(
        cross=CrossAttentionBlock(Config(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64, num_layers=2,
                                           cross_attention_layers=[1]), 1))), 0.02, torch.Generator().manual_seed(0))
    assert block["cross"].attn_gate.item() == 0 and block["cross"].mlp_gate.item() == 0
    assert torch.all(block["cross"].cross_attn.q_norm.weight == 1)


# ---- Method B: Mllama ------------------------------------------------------------------------------------------
def test_cross_attention_positions():
    assert cross_attention_positions(32, 4) == [3, 8, 13, 18, 23, 28, 33, 38]  # Llama 3.2 11B Vision's
    assert cross_attention_positions(4, 2) == [1, 4]
    assert cross_attention_positions(4, 1) == [0, 2, 4, 6]
    assert cross_attention_positions(4, 4) == [3]
    with pytest.raises(LmforgeError, match="no cross-attention layer"):
        cross_attention_positions(4, 5)
    assert tile_arrangements(4) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]


def test_mllama_layers_embeddings_and_head(decoder):
    model = compose_mllama(decoder, **TINY_VISION)
    text, cfg = model.language_model, model.config
    assert cfg.text.cross_attention_layers == [1, 4] and cfg.text.num_layers == 6 and cfg.image_token_id == V
    assert cfg.text.vocab_size == V and cfg.text.embedding_rows == V + 8 and not cfg.text.tie_embeddings
    for old, new in enumerate([0, 2, 3, 5]):  # the decoder's self-attention layers, renumbered
        mine, theirs = text.model.layers[new].state_dict(), decoder.model.layers[old].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    for layer in (1, 4):
        block = text.model.layers[layer]
        assert block.attn_gate.item() == 0 and block.mlp_gate.item() == 0
    embed = text.model.embed_tokens.weight
    assert embed.shape == (V + 8, 64) and torch.equal(embed[:V], decoder.model.embed_tokens.weight)
    assert torch.allclose(embed[V:], decoder.model.embed_tokens.weight.mean(0).expand(8, -1))
    assert text.lm_head.weight is not embed and torch.equal(text.lm_head.weight, decoder.lm_head.weight)
    counts = parameter_counts(model)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    explicit = compose_mllama(decoder, cross_attention_layers=[5, 0], **TINY_VISION)
    assert explicit.config.text.cross_attention_layers == [0, 5]


def test_mllama_logits_equal_the_decoder_at_init_with_and_without_images(decoder):
    model = compose_mllama(decoder, max_num_tiles=2, **TINY_VISION)
    ids, mask = text_batch(seed=1)
    images = mllama_images(2, tiles=2)
    cross = torch.zeros(2, ids.shape[1], 1, 2, dtype=torch.long)
    cross[:, 6:, 0, 0] = 1  # the second half sees the image's tile
    with torch.no_grad():
        ref = decoder(ids, mask)
        assert torch.equal(model(ids, mask), ref)  # text only: the cross-attention layers are skipped
        assert torch.equal(model(ids, mask, **images, cross_attention_mask=cross), ref)  # gates at zero
        assert torch.equal(model(ids, mask, **images), ref)
        # with <|image|> in the text: the decoder sees the placeholder's (mean) embedding
        with_token = ids.clone()
        with_token[:, 6] = V
        embeds = decoder.model.embed_tokens(ids)
        embeds[:, 6] = decoder.model.embed_tokens.weight.mean(0)
        assert torch.equal(model(with_token, mask, **images, cross_attention_mask=cross),
                           decoder(inputs_embeds=embeds, attention_mask=mask))
        # opened gates: the image reaches the logits (every row: one that sees no tile attends to all of them,
        # only its MLP output is dropped, as in transformers)
        for layer in model.config.text.cross_attention_layers:
            model.language_model.model.layers[layer].attn_gate.fill_(1.0)
        opened = model(ids, mask, **images, cross_attention_mask=cross)
    changed = (opened - ref).abs().amax(-1)
    assert changed.min() > 1e-6


# ---- saved directories load in transformers --------------------------------------------------------------------
@pytest.mark.parametrize("family", ["clip_vision_model", "siglip_vision_model"])
def test_transformers_loads_composed_llava(decoder, tmp_path, family):
    model = compose_llava(decoder, image_token_id=V, vision_family=family, **TINY_VISION)
    out = save_composed(model, tmp_path / "llava")
    assert json.loads((out / "preprocessor_config.json").read_text()) == image_processor_config(model)
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    per_image = model.config.num_image_tokens
    ids, mask = text_batch(seed=2, length=14)
    ids[0, 3:3 + per_image] = V
    ids[1, 6:6 + per_image] = V
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids, mask, pixel_values=pixels)
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=hf_positions(mask)).logits
        other = model(ids, mask, pixel_values=pixels.flip(0))
    diff = masked_max_diff(ours, ref, mask)
    print(f"composed llava ({family}) vs transformers: max |dlogits| = {diff:.2e}")
    assert ours.shape == ref.shape == (2, 14, V + 1) and diff <= ATOL
    assert (other - ours).abs().max() > 1e-6  # the images reach the logits
    again = load_model(out)
    with torch.no_grad():
        assert torch.equal(again(ids, mask, pixel_values=pixels), ours)


def test_transformers_loads_composed_mllama(decoder, tmp_path):
    model = compose_mllama(decoder, max_num_tiles=2, **TINY_VISION)
    with torch.no_grad():  # open every gate, so the cross-attention layers and the tiled ViT's gates all count
        for name, p in model.named_parameters():
            if "gate" in name:
                p.copy_(torch.randn_like(p))
    out = save_composed(model, tmp_path / "mllama")
    hf, info = transformers.MllamaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    ids, mask = text_batch(seed=4)
    ids[0, 2], ids[1, 5] = V, V
    cross = torch.zeros(2, ids.shape[1], 1, 2, dtype=torch.long)
    cross[0, 2:, 0, :1] = 1
    cross[1, 5:, 0, :1] = 1
    batch = dict(input_ids=ids, attention_mask=mask, **mllama_images(2, tiles=2, seed=5), cross_attention_mask=cross)
    with torch.no_grad():
        ours = model(**batch)
        ref = hf(**batch, position_ids=hf_positions(mask)).logits
    diff = masked_max_diff(ours, ref, mask)
    print(f"composed mllama vs transformers: max |dlogits| = {diff:.2e}")
    assert ours.shape == ref.shape == (2, 12, V) and diff <= ATOL
    again = load_model(out)
    with torch.no_grad():
        assert torch.equal(again(**batch), ours)


# ---- lmforge build-vlm ---------------------------------------------------------------------------------------
def picture():
    image = Image.new("RGB", (40, 24), (30, 120, 200))
    ImageDraw.Draw(image).ellipse((5, 3, 30, 20), fill=(250, 200, 20))
    return image


@pytest.mark.parametrize("method", ["llava", "mllama"])
def test_build_vlm_cli_end_to_end(decoder_dir, decoder, tmp_path, capsys, method):
    from lmforge.data.image_processor import load_processor
    from lmforge.data.tokenizer import load_tokenizer

    out = tmp_path / method
    assert main(["build-vlm", "--decoder", str(decoder_dir), "--method", method, "--out", str(out), *TINY_FLAGS,
                 "--cross-attention-every", "2", "--seed", "3"]) == 0
    summary = capsys.readouterr().out.strip()
    print(summary)
    assert summary.count("\n") == 0 and summary.startswith(f"wrote {out}: {method}")
    token = "<image>" if method == "llava" else "<|image|>"
    assert ("4 image tokens per image" if method == "llava" else "5 cross-attended states per image") in summary

    tokenizer = load_tokenizer(out)
    assert tokenizer.encode(f"a {token} cat", add_special_tokens=False) == [4, V, 5]
    assert tokenizer.decode([4, V, 5]) == "a cat"  # a special token: skipped when decoding
    assert json.loads((out / "tokenizer_config.json").read_text())["extra_special_tokens"] == [token]
    assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(token) == V

    model = load_model(out)
    assert isinstance(model, LlavaForConditionalGeneration if method == "llava" else MllamaForConditionalGeneration)
    assert model.config.image_token_id == V
    processor = load_processor(out)
    inputs = processor(f"{token} what is this ?", images=[picture()])
    with torch.no_grad():
        logits = model(**inputs)
        text_only = model(inputs["input_ids"][inputs["input_ids"] != V][None])
        ref = decoder(inputs["input_ids"][inputs["input_ids"] != V][None])
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    assert torch.equal(text_only[..., :V], ref)  # the decoder, kept exactly
    if method == "llava":
        assert model.config.text.vocab_size == V + 1 and inputs["input_ids"].shape[1] == 4 + 4
        assert inputs["pixel_values"].shape == (1, 3, 16, 16)
    else:
        assert model.config.text.cross_attention_layers == [1, 4]
        assert inputs["pixel_values"].shape == (1, 1, 1, 3, 16, 16)
        assert torch.equal(logits, decoder(inputs_embeds=model.language_model.model.embed_tokens(
            inputs["input_ids"]), attention_mask=inputs["attention_mask"]))  # gates closed: still the decoder


# ---- bad input ---------------------------------------------------------------------------------------------
def tiny_decoder(model_type: str) -> Transformer:
    extra = dict(attention_bias=True) if model_type == "qwen2" else {}
    if model_type == "gpt2":
        extra = dict(norm="layernorm", mlp="plain", activation="gelu_tanh", position_embedding="learned",
                     attention_bias=True, attention_out_bias=True, mlp_bias=True, tie_embeddings=True)
    config = Config(model_type=model_type, vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2
                    if model_type != "gpt2" else 4, head_dim=8, intermediate_size=64, **extra)
    return Transformer(config).init_weights(seed=0)


def test_bad_decoders_and_image_tokens(decoder):
    with pytest.raises(LmforgeError, match="text model is a Llama"):
        compose_mllama(tiny_decoder("qwen2"), **TINY_VISION)
    with pytest.raises(LmforgeError, match="cannot be the text model of a LLaVA"):
        compose_llava(tiny_decoder("gpt2"), image_token_id=V, **TINY_VISION)
    compose_llava(tiny_decoder("qwen2"), image_token_id=V, **TINY_VISION)  # any LLaVA decoder family works
    assert tiny_decoder("llama").config.pad_token_id is None  # no token ids in the config: still composes
    compose_mllama(tiny_decoder("llama"), **TINY_VISION)
    for bad in (V - 1, V + 8, -1):
        with pytest.raises(LmforgeError, match="input-only ids"):
            compose_mllama(decoder, image_token_id=bad, **TINY_VISION)
    with pytest.raises(LmforgeError, match="non-negative token id"):
        compose_llava(decoder, image_token_id=-1, **TINY_VISION)
    with pytest.raises(LmforgeError, match="no cross-attention layer"):
        compose_mllama(decoder, cross_attention_every=5, **TINY_VISION)
    with pytest.raises(LmforgeError, match="distinct indices"):
        compose_mllama(decoder, cross_attention_layers=[1, 1], **TINY_VISION)
    with pytest.raises(LmforgeError, match="supported_aspect_ratios"):
        compose_mllama(decoder, max_num_tiles=2, supported_aspect_ratios=[[1, 1]], **TINY_VISION)
    mllama = compose_mllama(decoder, **TINY_VISION)
    with pytest.raises(LmforgeError, match="needs a text decoder"):
        compose_llava(mllama, image_token_id=V)
    with pytest.raises(LmforgeError, match="plain text decoder"):
        compose_mllama(mllama.language_model)
    with pytest.raises(LmforgeError, match="not a vision-language model"):
        image_processor_config(decoder)


def test_build_vlm_cli_refuses_an_image_token_outside_mllamas_input_ids(decoder_dir, tmp_path, capsys):
    short = tmp_path / "tok"
    write_tokenizer(short, size=V - 4)  # a vocabulary padded past its tokenizer: <|image|> would get id V - 4
    out = tmp_path / "out"
    assert main(["build-vlm", "--decoder", str(decoder_dir), "--tokenizer", str(short), "--method", "mllama",
                 "--out", str(out), *TINY_FLAGS]) == 2
    err = capsys.readouterr().err
    assert f"id {V - 4}" in err and f"{V}..{V + 7}" in err and not out.exists()
    assert main(["build-vlm", "--decoder", str(decoder_dir), "--method", "llava", "--out", str(decoder_dir)]) == 2
    assert "--out must differ" in capsys.readouterr().err
