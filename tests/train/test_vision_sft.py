"""Visual instruction tuning on the one training loop: LLaVA and Mllama from chat JSONL with images, frozen parts
stay bit-identical, loss on assistant tokens only, checkpoints that transformers and our processor load."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.data.image_processor import load_processor
from lmforge.data.sft import IGNORE_INDEX
from lmforge.data.vision_sft import VisionSFTDataset, read_vision_chat_jsonl
from lmforge.errors import ConfigError, LmforgeError
from lmforge.models.checkpoint import load_model
from lmforge.train.recipe import load_recipe
from lmforge.train.run import build_trainer

transformers = pytest.importorskip("transformers")
from PIL import Image

from tests.models import test_llava, test_mllama

COLOURS = {"hi": (230, 20, 20), "this": (20, 20, 230)}  # the answer word says the image's colour


def write_data(path, image_token: str, n: int = 24) -> tuple:
    (path / "img").mkdir(parents=True)
    with open(path / "train.jsonl", "w") as f:
        for i in range(n):
            answer = ("hi", "this")[i % 2]
            Image.new("RGB", (20 + i, 24), COLOURS[answer]).save(path / "img" / f"{i}.png")
            f.write(json.dumps({"messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what is this ?"}]},
                {"role": "assistant", "content": answer}], "images": [f"img/{i}.png"]}) + "\n")
    return path / "train.jsonl"


@pytest.fixture(scope="module", params=["llava", "mllama"])
def vlm_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":
        test_llava.build_hf_llava("clip_llama").save_pretrained(path)
        test_llava.hf_image_processor("clip").save_pretrained(path)
        test_llava.write_tokenizer(path)
        image_token = "<image>"
    else:
        test_mllama.build_hf_mllama().save_pretrained(path)
        test_mllama.hf_image_processor().save_pretrained(path)
        test_mllama.write_tokenizer(path)
        image_token = "<|image|>"
    return request.param, path, write_data(path / "data", image_token)


def recipe(path, data, out, trainable, **extra):
    values = {"task": "sft", "model": {"path": str(path), "trainable": trainable}, "out_dir": str(out),
              "data": {"train": [str(data)], "val_fraction": 0.0, "seq_len": 64}, "batch_size": 4,
              "max_steps": 12, "optim": {"lr": 1e-2, "warmup_steps": 0}, "save_every": 0, "eval_every": 0,
              "progress": False, "plot": False, "precision": "fp32", "device": "cpu", **extra}
    return load_recipe(None, defaults=values)


def test_labels_cover_the_answer_only_and_images_expand(vlm_dir):
    kind, path, data = vlm_dir
    processor = load_processor(path)
    records = read_vision_chat_jsonl(data)
    ds = VisionSFTDataset(records, processor, max_len=64)
    item = ds[0]
    image_positions = int((item["input_ids"] == processor.image_token_id).sum())
    assert image_positions == processor.tokens_per_image == (16 if kind == "llava" else 1)
    targets = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert processor.tokenizer.decode(targets).strip().startswith("hi")
    batch = ds.collate([ds[0], ds[1], ds[2]], pad_id=0)
    if kind == "llava":
        assert batch["pixel_values"].shape == (3, 3, 32, 32)
    else:
        assert batch["pixel_values"].shape[:2] == (3, 1)
        assert batch["cross_attention_mask"].shape[:3] == (3, batch["input_ids"].shape[1], 1)


def test_training_moves_only_the_trainable_parts_and_saves_a_loadable_checkpoint(vlm_dir, tmp_path):
    kind, path, data = vlm_dir
    # LLaVA's stage 2 (projector + decoder; the tower frozen); Mllama's recipe (projector + a cross-attention layer)
    # (a random decoder is no language model: its head trains too, so the loss can fall within a few steps)
    trainable = ["multi_modal_projector.*", "language_model.*"] if kind == "llava" else [
        "multi_modal_projector.*", "language_model.model.layers.[13].*", "language_model.lm_head.*"]
    trainer = build_trainer(recipe(path, data, tmp_path / "run", trainable))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.fit()
    assert result.losses[-1] < 0.7 * result.losses[0], result.losses
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    allowed = ("multi_modal_projector", "language_model" if kind == "llava" else
               ("language_model.model.layers.1.", "language_model.model.layers.3.", "language_model.lm_head"))
    assert changed and all(n.startswith(allowed[0]) or n.startswith(allowed[1]) for n in changed)
    assert any(n.startswith("multi_modal_projector") for n in changed)
    saved = result.final_checkpoint / "model"
    assert (saved / "preprocessor_config.json").is_file()
    model = load_model(saved)
    processor = load_processor(saved)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what is this ?"}]}]
    batch = processor.apply_chat_template(chat, images=[Image.new("RGB", (30, 30), COLOURS["hi"])])
    hf_class = getattr(transformers, "LlavaForConditionalGeneration" if kind == "llava" else
                       "MllamaForConditionalGeneration")
    hf = hf_class.from_pretrained(saved).eval()
    with torch.no_grad():
        ours, ref = model(**batch), hf(**batch).logits
    assert (ours - ref).abs().max() <= 1e-4


def test_trainable_pattern_matching_nothing_names_the_parameters(vlm_dir, tmp_path):
    kind, path, data = vlm_dir
    with pytest.raises(ConfigError, match="'multi_modal_projektor.*' matches no parameter.*multi_modal_projector"):
        build_trainer(recipe(path, data, tmp_path / "run", ["multi_modal_projektor.*"]))


def test_bad_vision_records_are_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    bad = tmp_path / "bad.jsonl"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}
    rows = [{"messages": [user, {"role": "assistant", "content": "a"}], "images": ["a.png", "b.png"]}]
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(LmforgeError, match=r"bad.jsonl:1: the messages have 1 image part\(s\) but 'images' lists 2"):
        read_vision_chat_jsonl(bad)
    rows[0]["images"] = ["missing.png"]
    bad.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(LmforgeError, match="bad.jsonl:1: image file .*missing.png does not exist"):
        read_vision_chat_jsonl(bad)
    rows[0]["images"] = ["a.png"]  # an empty file: found, but no image
    bad.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(LmforgeError, match="bad.jsonl:1: .*a.png"):
        read_vision_chat_jsonl(bad)


def test_placeholder_spelled_in_the_text_is_caught_per_conversation(vlm_dir, tmp_path):
    kind, path, data = vlm_dir
    processor = load_processor(path)
    records = read_vision_chat_jsonl(data)[:2]
    user = records[1]["messages"][0]
    user["content"] = [*user["content"], {"type": "text", "text": " " + processor.image_token}]
    with pytest.raises(LmforgeError, match=r"train.jsonl:2: the rendered conversation holds 2 image placeholder\(s\)"
                                           r" .* for 1 image\(s\)"):
        VisionSFTDataset(records, processor, max_len=64)


def test_replay_with_images_is_refused(vlm_dir, tmp_path):
    kind, path, data = vlm_dir
    cfg = recipe(path, data, tmp_path / "run", [])
    cfg.data.replay.train, cfg.data.replay.fraction = [str(data)], 0.2
    with pytest.raises(ConfigError, match="replay of pretraining text is for text models"):
        build_trainer(cfg)


def test_lora_adapts_the_decoder_only_and_merges_into_a_loadable_checkpoint(vlm_dir, tmp_path):
    kind, path, data = vlm_dir
    cfg = recipe(path, data, tmp_path / "run", ["multi_modal_projector.*"])
    cfg.lora.enabled = True
    if kind == "mllama":  # PEFT has no names for LoRA on cross-attention layers: refused before any training
        with pytest.raises(ConfigError, match="adapts cross-attention layers .*model.trainable"):
            build_trainer(cfg)
        return
    trainer = build_trainer(cfg)
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    adapters = [n for n in trained if "lora_" in n]
    assert adapters and all(n.startswith("language_model.") for n in adapters)  # never the vision tower
    assert set(trained) - set(adapters) == {n for n in trained if n.startswith("multi_modal_projector.")}
    result = trainer.fit()
    merged = load_model(result.final_checkpoint / "model")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    # the projector trained too, so an adapter alone would not be the run: only the merged model is written
    assert not (result.final_checkpoint / "adapter").exists()
    cfg.model.trainable, cfg.out_dir = [], str(tmp_path / "run_adapters_only")
    assert (build_trainer(cfg).fit().final_checkpoint / "adapter" / "adapter_model.safetensors").is_file()
