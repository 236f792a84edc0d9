"""Tasks with images (``image: FIELD``): multiple choice by log-likelihood and greedy generation on LLaVA and Mllama,
checked against the model run by hand on the same processor batch; the built-in shapes tasks; bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from lmforge import load_model
from lmforge.data.image_processor import load_image, load_processor
from lmforge.errors import ConfigError, LmforgeError
from lmforge.eval import runner
from lmforge.eval.tasks import load_task, resolve_task
from lmforge.models.generate import default_eos_ids, generate

pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from ..models.test_quant_vlm import save_tiny_vlm  # noqa: E402 - the tiny random VLMs with processor + tokenizer

KINDS = ("llava", "mllama")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module", params=KINDS)
def vlm_dir(request, tmp_path_factory):
    return save_tiny_vlm(request.param, tmp_path_factory.mktemp(f"eval_{request.param}"))


def write_task(tmp_path, kind: str = "multiple_choice", n: int = 4, **fields) -> tuple:
    """A task over ``n`` drawn images (each different) in tmp_path/data; returns (yaml path, images)."""
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True, exist_ok=True)
    images, records = [], []
    for i in range(n):
        img = Image.new("RGB", (40 + 7 * i, 40), (60 * i % 255, 200 - 40 * i, 90))
        img.paste((255, 255, 0), (5 + 3 * i, 5, 20 + 3 * i, 25))
        img.save(data / "img" / f"{i}.png")
        images.append(load_image(data / "img" / f"{i}.png"))
        records.append({"picture": f"img/{i}.png", "q": "what is this ?", "options": ["hi", "this", "what"],
                        "gold": i % 3, "answer": "hi"})
    (data / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {"name": "vision", "type": kind, "data": "data/docs.jsonl", "image": "picture", "prompt": "{q}",
            "target": "gold" if kind == "multiple_choice" else "answer", **fields}
    if kind == "multiple_choice":
        spec["choices"] = "options"
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, images


@pytest.mark.parametrize("chat", [False, True])
def test_multiple_choice_scores_match_the_model_by_hand(vlm_dir, tmp_path, chat):
    # a space before each choice: these word-level test tokenizers split words on whitespace only
    task_path, images = write_task(tmp_path, chat=chat, target_delimiter=" ")
    report = runner.evaluate([str(vlm_dir)], [str(task_path)], log_samples=True, batch_size=5)
    samples = next(iter(report["results"].values()))[load_task(task_path).name]["samples"]
    model, processor = load_model(vlm_dir), load_processor(vlm_dir)
    task = load_task(task_path)
    for sample, image in zip(samples, images):
        doc = task.docs[sample["doc"]]
        ctx = task.context(sample["doc"], processor.tokenizer, processor.image_token)
        assert ctx.count(processor.image_token) == 1
        for choice, got in zip(doc["options"], sample["loglikelihoods"]):
            full = processor(ctx + task.target_delimiter + choice, [image])
            n_ctx = processor(ctx, [image])["input_ids"].shape[1]
            with torch.inference_mode():
                logits = model(**full)[0]
            ids = full["input_ids"][0]
            logp = F.log_softmax(logits[n_ctx - 1:-1].float(), -1).gather(-1, ids[n_ctx:, None]).sum().item()
            assert got == pytest.approx(logp, abs=1e-4)
    # the image is read: the same question scores differently on different pictures (Mllama's cross-attention
    # gates start near zero, so its images move these scores by less)
    first = [s["loglikelihoods"] for s in samples]
    assert any(abs(a[0] - b[0]) > 1e-6 for a, b in zip(first, first[1:]))


def test_generate_matches_generate_by_hand(vlm_dir, tmp_path):
    task_path, images = write_task(tmp_path, kind="generate", image_position="after", max_new_tokens=3)
    report = runner.evaluate([str(vlm_dir)], [str(task_path)], log_samples=True, batch_size=3)
    result = next(iter(report["results"].values()))["vision"]
    model, processor = load_model(vlm_dir), load_processor(vlm_dir)
    task = load_task(task_path)
    assert result["n"] == 4
    for sample, image in zip(result["samples"], images):
        ctx = task.context(sample["doc"], processor.tokenizer, processor.image_token)
        assert ctx.endswith(processor.image_token)
        batch = processor(ctx, [image])
        ids = batch.pop("input_ids")
        eos = list(dict.fromkeys([*processor.tokenizer.eos_ids, *default_eos_ids(model)]))
        new = generate(model, ids, max_new_tokens=3, eos_ids=eos, **batch)[0].tolist()
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))
        assert sample["completion"] == processor.tokenizer.decode(new[:cut], skip_special_tokens=True)
        assert sample["exact_match"] == float(sample["completion"].strip() == "hi")


def test_builtin_shapes_tasks_run_on_a_vision_model(vlm_dir):
    for name in ("shapes_vqa", "shapes_mc"):
        task = resolve_task(name)
        assert len(task.docs) == 150 and all(task.image_path(d).is_file() for d in task.docs)
        assert {d["type"] for d in task.docs} == {"colour", "shape", "count", "left_right", "top_bottom"}
    # (shapes_mc scores each answer right after the chat prompt, which these word-level test tokenizers cannot split)
    report = runner.evaluate([str(vlm_dir)], ["shapes_vqa"], limit=3)
    assert next(iter(report["results"].values()))["shapes_vqa"]["n"] == 3


def test_image_tasks_refuse_text_models_before_loading(tmp_path, model_dir, monkeypatch):
    task_path, _ = write_task(tmp_path)
    monkeypatch.setattr("lmforge.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(LmforgeError, match="have images; .* is not a vision-language model"):
        runner.evaluate([str(model_dir)], [str(task_path)])


def test_bad_image_tasks_are_config_errors(tmp_path):
    task_path, _ = write_task(tmp_path)
    (tmp_path / "data" / "img" / "2.png").unlink()
    with pytest.raises(ConfigError, match=r"record 3 of data/docs.jsonl: image .*2.png does not exist"):
        load_task(task_path)
    task_path, _ = write_task(tmp_path / "b", fewshot=1)
    with pytest.raises(ConfigError, match="takes no few-shot examples"):
        load_task(task_path)
    task_path, _ = write_task(tmp_path / "c", image_position="middle")
    with pytest.raises(ConfigError, match="'image_position' must be 'before' or 'after'"):
        load_task(task_path)
    spec = yaml.safe_load(task_path.read_text())
    spec.update(type="perplexity", image_position="before")
    task_path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="field 'image' is for generate and multiple_choice tasks"):
        load_task(task_path)
