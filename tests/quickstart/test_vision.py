"""`lmforge quickstart-vision` end to end on a stand-in quickstart run (tiny decoder, tiny sizes), and the vision
tower's pretraining on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge import save_model
from lmforge.cli import main
from lmforge.data.synthetic import skill_examples
from lmforge.data.tokenizer import train_bpe_tokenizer
from lmforge.models.config import Config
from lmforge.models.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def stand_in_run(tmp_path):
    """A quickstart run directory whose summary names a tiny chat model with the quickstart's ChatML template."""
    run = tmp_path / "qs"
    texts = [m["content"] for r in skill_examples(200, seed=0) for m in r["messages"]]
    texts += ["What colour is the circle? red green blue yellow left right above below 0 1 2 3 square triangle"]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    cfg = Config.from_hf(dict(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=256, tie_word_embeddings=True))
    save_model(Transformer(cfg).init_weights(std=0.05, seed=0), run / "sft", tokenizer=tok)
    (run / "summary.json").write_text(json.dumps({"checkpoint": str(run / "sft")}))
    return run


def test_quickstart_vision_trains_and_reports_both_methods(tmp_path, capsys):
    run = stand_in_run(tmp_path)
    args = ["quickstart-vision", "--run", str(run), "--train-size", "60", "--test-size", "20", "--steps", "4",
            "--batch-size", "8", "--tower-steps", "3", "--tower-scenes", "40", "--vision-hidden", "32",
            "--image-size", "32", "--patch-size", "8", "--precision", "fp32"]
    assert main(args) == 0
    out = run / "vision"
    summary = json.loads((out / "summary.json").read_text())
    # 32 px / 8 px patches: LLaVA splices 16 image tokens (class token dropped); Mllama cross-attends to 17 states
    assert summary["image_tokens"] == {"llava": 16, "cross_attention": 17}
    cost = summary["cost"]
    assert cost["llava"]["decoder_positions"] - cost["cross_attention"]["decoder_positions"] == pytest.approx(15)
    accuracy = summary["accuracy"]
    assert set(accuracy) == {"chance", "text_only", "llava", "cross_attention"}
    assert accuracy["chance"]["colour"] == 0.25 and accuracy["chance"]["left_right"] == 0.5
    # every accuracy is a count over the 20 held-out questions (4 per type)
    assert all(abs(v * 4 - round(v * 4)) < 1e-9 for k in ("llava", "cross_attention", "text_only")
               for t, v in accuracy[k].items() if t != "all")
    assert set(summary["tower"]) == {"llava", "cross_attention"}
    for name in ("llava", "cross_attention", "text_only"):
        assert (Path(summary["checkpoints"][name]) / "config.json").is_file()
    assert (Path(summary["checkpoints"]["llava"]) / "preprocessor_config.json").is_file()
    report = (out / "report.md").read_text()
    assert "| question type | chance | text only | A: LLaVA | B: cross-attention |" in report
    assert "held-out accuracy" in capsys.readouterr().out
    # the card of the run lists this quickstart's headline
    assert "vision" in (run / "report.md").read_text()

    assert main(["quickstart-vision", "--run", str(tmp_path / "missing")]) == 2
    assert "lmforge quickstart" in capsys.readouterr().err
    assert main(args + ["--stage1-fraction", "1"]) == 2
    assert "--stage1-fraction in (0, 1)" in capsys.readouterr().err


def test_tower_pretraining_learns_patch_colours():
    """The stand-in for a pretrained CLIP: a few hundred steps teach a tiny tower each patch's colour."""
    from lmforge.data.image_processor import ImageProcessor
    from lmforge.models.compose import compose_llava, image_processor_config
    from lmforge.quickstart.vision import pretrain_tower

    decoder = Transformer(Config.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)))
    model = compose_llava(decoder, image_token_id=63, image_size=32, patch_size=8, vision_hidden=32, vision_layers=1)
    image_processor = ImageProcessor.from_dict(image_processor_config(model))
    before = pretrain_tower(model, image_processor, 8, scenes=200, steps=1, batch_size=32, lr=3e-3, seed=0,
                            image_size=32)
    after = pretrain_tower(model, image_processor, 8, scenes=200, steps=150, batch_size=32, lr=3e-3, seed=0,
                           image_size=32)
    assert after["colour"] > 0.9 > before["colour"]
