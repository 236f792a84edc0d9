"""Run tasks against models: per-task metrics with bootstrap standard errors, JSON and a Markdown table."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import ConfigError, LmforgeError
from lmforge.eval import scoring
from lmforge.eval.code import build_program, extract_code, pass_at_k, run_programs
from lmforge.eval.tasks import Task, resolve_tasks


class Evaluator:
    """Scores one model on tasks. ``limit`` keeps the first N docs of each task (a fixed subset)."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 16, limit: int | None = None,
                 bootstrap_iters: int = 1000, seed: int = 1234, max_length: int | None = None,
                 log_samples: bool = False, processor: Any = None) -> None:
        """``processor``: a vision-language model's (``lmforge.data.image_processor.load_processor``), which
        tasks with images need."""
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.batch_size, self.limit, self.seed = batch_size, limit, seed
        self.bootstrap_iters, self.max_length, self.log_samples = bootstrap_iters, max_length, log_samples

    # ---- shared ----------------------------------------------------------------------------------
    def _indices(self, task: Task) -> range:
        return range(len(task.docs) if self.limit is None else min(self.limit, len(task.docs)))

    def _context(self, task: Task, i: int) -> str:
        # chat tasks go through the tokenizer's chat template; a task with images places the processor's placeholder
        if task.image is None or self.processor is None:
            return task.context(i, self.tokenizer)
        return self.processor.prompt_text(task.context(i, self.tokenizer, self.processor.image_token))

    def _images(self, task: Task, indices: Sequence[int]) -> list[Any]:
        from lmforge.data.image_processor import load_image

        if self.processor is None:
            raise LmforgeError(f"task {task.name} ({task.source}) has images (field 'image'): it needs a "
                               "vision-language model (LLaVA, Mllama) and its processor")
        return [load_image(task.image_path(task.docs[i])) for i in indices]

    def _stderr(self, values: Any, aggregate: Any = None) -> float:
        return scoring.bootstrap_stderr(values, aggregate, iters=self.bootstrap_iters, seed=self.seed)

    def run(self, task: Task) -> dict[str, Any]:
        start = time.perf_counter()
        method = {"multiple_choice": self._multiple_choice, "generate": self._generate,
                  "perplexity": self._perplexity, "code": self._code}[task.type]
        metrics, samples = method(task)
        out: dict[str, Any] = {"type": task.type, "n": len(samples), **metrics,
                               "seconds": round(time.perf_counter() - start, 3)}
        if self.log_samples:
            out["samples"] = samples
        return out

    # ---- task types ------------------------------------------------------------------------------
    def _multiple_choice(self, task: Task) -> tuple[dict, list]:
        requests, spans, samples = [], [], []
        for i in self._indices(task):
            ctx, choices = self._context(task, i), task.choice_list(task.docs[i])
            spans.append((len(requests), len(choices)))
            requests += [(ctx, task.target_delimiter + c) for c in choices]
        if task.image is None:
            scores = scoring.loglikelihood(self.model, self.tokenizer, requests, self.batch_size, self.max_length)
        else:  # each doc's image once per choice, in request order
            images = [img for (_, n), img in zip(spans, self._images(task, self._indices(task))) for _ in range(n)]
            pairs = [scoring.encode_pair(self.tokenizer, c, x) for c, x in requests]
            scores = scoring.loglikelihood_images(self.model, self.processor, pairs, images, self.batch_size,
                                                  self.max_length)
        per_doc = {m: [] for m in task.metrics}
        for i, (first, n) in zip(self._indices(task), spans):
            doc = task.docs[i]
            lls = [s for s, _ in scores[first:first + n]]
            gold = task.gold_index(doc)
            m = scoring.choice_metrics(lls, task.choice_list(doc), gold)
            for name in task.metrics:
                per_doc[name].append(m[name])
            samples.append({"doc": i, "loglikelihoods": lls, "is_greedy": [g for _, g in scores[first:first + n]],
                            "gold": gold, **m})
        return self._means(per_doc), samples

    def _generate(self, task: Task) -> tuple[dict, list]:
        idx = list(self._indices(task))
        prompts = [self._context(task, i) for i in idx]
        if task.image is None:
            outs = scoring.generate_texts(self.model, self.tokenizer, prompts, task.max_new_tokens, task.stop,
                                          self.batch_size, task.temperature, self.seed)
        else:
            if task.temperature > 0:
                raise LmforgeError(f"task {task.name}: tasks with images generate greedily (temperature 0), got "
                                   f"temperature {task.temperature}")
            outs = scoring.generate_with_images(self.model, self.processor, prompts, self._images(task, idx),
                                                task.max_new_tokens, task.stop, self.batch_size)
        hits, samples = [], []
        for i, text in zip(idx, outs):
            ref, pred = str(task.docs[i][task.target]), task.extract(text)
            hits.append(scoring.exact_match(pred, ref))
            samples.append({"doc": i, "completion": text, "extracted": pred, "target": ref,
                            "exact_match": hits[-1]})
        return self._means({"exact_match": hits}), samples

    def _perplexity(self, task: Task) -> tuple[dict, list]:
        idx = list(self._indices(task))
        texts = [str(task.docs[i][task.target]) for i in idx]
        lls = scoring.loglikelihood_rolling(self.model, self.tokenizer, texts, self.batch_size, self.max_length)
        rows = np.array([[ll, *scoring.doc_weights(t)] for ll, t in zip(lls, texts)], dtype=np.float64)
        values = scoring.perplexity_metrics(rows[:, 0], rows[:, 1], rows[:, 2])
        out = {}
        for name in task.metrics:
            out[name] = values[name]
            out[f"{name}_stderr"] = self._stderr(rows, lambda r, name=name: scoring.perplexity_metrics(
                r[:, 0], r[:, 1], r[:, 2])[name])
        samples = [{"doc": i, "loglikelihood": ll, "words": int(w), "bytes": int(b)}
                   for i, (ll, w, b) in zip(idx, rows.tolist())]
        return out, samples

    def _code(self, task: Task) -> tuple[dict, list]:
        idx = list(self._indices(task))
        prompts = [self._context(task, i) for i in idx]
        completions = [[] for _ in idx]
        for s in range(task.samples):  # one batched generation per sample index, distinct seeds
            outs = scoring.generate_texts(self.model, self.tokenizer, prompts, task.max_new_tokens, task.stop,
                                          self.batch_size, task.temperature, self.seed + 1000 * s)
            for j, text in enumerate(outs):
                completions[j].append(text)
        programs = [build_program(task.program_prefix(task.docs[i]), c, str(task.docs[i][task.target]),
                                  task.entry_point) for j, i in enumerate(idx) for c in completions[j]]
        results = run_programs(programs, task.timeout_s, task.memory_mb)
        per_doc = {f"pass@{k}": [] for k in task.k}
        samples = []
        for j, i in enumerate(idx):
            mine = results[j * task.samples:(j + 1) * task.samples]
            c = sum(r.passed for r in mine)
            for k in task.k:
                per_doc[f"pass@{k}"].append(pass_at_k(task.samples, c, k))
            samples.append({"doc": i, "completions": completions[j], "code": [extract_code(c) for c in completions[j]],
                            "status": [r.status for r in mine],
                            "detail": [r.detail for r in mine], "passed": c})
        return self._means(per_doc), samples

    def _means(self, per_doc: dict[str, list[float]]) -> dict[str, float]:
        out = {}
        for name, values in per_doc.items():
            out[name] = float(np.mean(values)) if values else float("nan")
            out[f"{name}_stderr"] = self._stderr(values)
        return out


# ---- many models, many tasks -------------------------------------------------------------------
def evaluate(model_paths: Sequence[str], task_names: Sequence[str], *, limit: int | None = None,
             batch_size: int = 16, device: str = "auto", dtype: str = "float32", bootstrap_iters: int = 1000,
             seed: int = 1234, log_samples: bool = False, progress: Any = None,
             task_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate each model on each task; returns {"config", "results": {model: {task: metrics}}}.

    ``task_options`` overrides task fields for this run (see :func:`lmforge.eval.tasks.resolve_tasks`), e.g.
    ``{"chat": True}`` or ``{"code": {"max_new_tokens": 512}}``; results are keyed by the task's name,
    which then records the options (``larger[chat=true]``)."""
    import torch

    from lmforge.data.image_processor import load_processor
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import load_model
    from lmforge.models.checkpoint import config_model_type
    from lmforge.models.vision import VISION_LANGUAGE_MODEL_TYPES

    if not model_paths:
        raise ConfigError("no model given")
    if not task_names:
        raise ConfigError("no task given")
    tasks = resolve_tasks(task_names, task_options)  # validate every task before loading any model
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    results: dict[str, Any] = {}
    for path in model_paths:
        vision = Path(path).is_dir() and config_model_type(path) in VISION_LANGUAGE_MODEL_TYPES
        with_images = [t.name for t in tasks if t.image is not None]
        if with_images and not vision:  # before loading the model
            raise LmforgeError(f"task(s) {', '.join(with_images)} have images; {path} is not a vision-language model "
                               f"({'/'.join(VISION_LANGUAGE_MODEL_TYPES)})")
        model = load_model(path, dtype=getattr(torch, dtype), device=device).eval()
        tokenizer = load_tokenizer(path)
        ev = Evaluator(model, tokenizer, batch_size=batch_size, limit=limit, bootstrap_iters=bootstrap_iters,
                       seed=seed, log_samples=log_samples, processor=load_processor(path) if vision else None)
        label = _unique_label(str(path), results)
        results[label] = {}
        for task in tasks:
            if task.chat and getattr(tokenizer, "chat_template", None) is None:
                raise LmforgeError(f"task {task.name} ({task.source}) uses chat: true but {path} has no chat template")
            results[label][task.name] = ev.run(task)
            if progress:
                progress(label, task.name, results[label][task.name])
        del model
    config = {"models": list(model_paths), "tasks": [t.name for t in tasks], "limit": limit,
              "batch_size": batch_size, "device": device, "dtype": dtype, "seed": seed,
              "bootstrap_iters": bootstrap_iters}
    if task_options:
        config["task_options"] = dict(task_options)
    return {"config": config, "results": results}


def _unique_label(label: str, taken: dict) -> str:
    n, out = 2, label
    while out in taken:
        out, n = f"{label} ({n})", n + 1
    return out


def _fmt(value: float, stderr: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = _num(value)
    if stderr is not None and not math.isnan(stderr):
        text += f" ± {_num(stderr)}"
    return text


def _num(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"  # perplexities of untrained models are huge


def markdown_table(report: dict[str, Any]) -> str:
    """Tasks × metrics as rows, models side by side as columns."""
    results = report["results"]
    models = list(results)
    header = "| task | metric | n | " + " | ".join(models) + " |"
    lines = [header, "|" + " --- |" * (3 + len(models))]
    seen: list[tuple[str, str]] = []
    for per_task in results.values():
        for task, metrics in per_task.items():
            for key in metrics:
                if key in ("type", "n", "seconds", "samples") or key.endswith("_stderr"):
                    continue
                if (task, key) not in seen:
                    seen.append((task, key))
    for task, key in seen:
        ns = {str(results[m][task]["n"]) for m in models if task in results[m]}
        cells = []
        for m in models:
            r = results[m].get(task, {})
            cells.append(_fmt(r.get(key), r.get(f"{key}_stderr")) if key in r else "–")
        lines.append(f"| {task} | {key} | {'/'.join(sorted(ns))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    from lmforge.io import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        json.dump(report, f, indent=2)
    return path
