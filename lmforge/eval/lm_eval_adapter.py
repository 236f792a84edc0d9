"""lmforge models as an lm-evaluation-harness model, registered as ``lmforge``.

Importing this module registers the model with lm-eval (``lm_eval`` must be installed; lmforge itself
does not depend on it). Scoring goes through :mod:`lmforge.eval.scoring`, which already defines
log-likelihood, rolling log-likelihood and greedy generation exactly as lm-eval's ``HFLM`` does, so
``--model lmforge`` and ``--model hf`` give the same numbers on the same checkpoint.

Command line: ``lm_eval --model lmforge --model_args pretrained=PATH --tasks ... --include_path DIR``. The
``lm_eval`` script only knows models whose module was imported, so start it through Python with this
module loaded first::

    python -c "import lmforge.eval.lm_eval_adapter; from lm_eval.__main__ import cli_evaluate; cli_evaluate()" \\
        --model lmforge --model_args pretrained=PATH,dtype=float32,max_length=2048 \\
        --tasks my_task --include_path DIR --batch_size 8 --device cpu

Python::

    import lm_eval
    from lm_eval.tasks import TaskManager
    import lmforge.eval.lm_eval_adapter  # noqa: F401  (registers "lmforge")

    results = lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=PATH,batch_size=8",
                                      tasks=["my_task"], task_manager=TaskManager(include_path="DIR"))

or pass an instance: ``simple_evaluate(model=LmforgeLM(pretrained=PATH), ...)``.

Model arguments: ``pretrained`` (a local HF-format directory with config.json, safetensors and
tokenizer.json), ``tokenizer`` (another tokenizer directory; default: ``pretrained``), ``batch_size``
(int; ``auto`` means 16), ``device`` (``cpu``, ``cuda``, ``cuda:1``...), ``dtype`` (``float32``,
``bfloat16``, ``float16``; ``auto`` means float32) and ``max_length`` (context length for scoring;
default: the model's ``max_position_embeddings``). Generation honours ``until``, ``max_gen_toks``
(default 256), ``do_sample`` and ``temperature`` from each request's ``gen_kwargs``; it uses the model's
whole context.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lmforge.errors import LmforgeError
from lmforge.eval import scoring

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "auto": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16}


def _dtype(value: str | torch.dtype | None) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise LmforgeError(f"unknown dtype {value!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


def _batch_size(value: int | str | None) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise LmforgeError(f"batch_size must be >= 1, got {value}")
    return size


@register_model("lmforge")
class LmforgeLM(LM):
    """An lmforge ``Transformer`` + ``Tokenizer`` behind lm-eval's ``LM`` interface."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, batch_size: int | str | None = None,
                 device: str | None = None, dtype: str | torch.dtype | None = None,
                 max_length: int | str | None = None, max_batch_size: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        from lmforge import load_model
        from lmforge.data.tokenizer import load_tokenizer

        del max_batch_size  # lm-eval passes it for batch_size=auto; we use a fixed size
        if kwargs:
            raise LmforgeError(f"unknown lmforge model_args: {sorted(kwargs)}")
        self._device = torch.device(device or "cpu")
        self.model = load_model(pretrained, dtype=_dtype(dtype), device=self._device).eval()
        self.tokenizer = load_tokenizer(tokenizer or pretrained)
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length) if max_length else scoring.model_max_length(self.model)
        self._name = str(tokenizer or pretrained)

    # -- lm-eval interface
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [tuple(r.args) for r in requests]
        out = scoring.loglikelihood(self.model, self.tokenizer, args, self.batch_size, self.max_length)
        for a, res in zip(args, out):
            self.cache_hook.add_partial("loglikelihood", a, res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        docs = [r.args[0] for r in requests]
        out = scoring.loglikelihood_rolling(self.model, self.tokenizer, docs, self.batch_size, self.max_length)
        for d, res in zip(docs, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (d,), res)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        # Requests sharing generation settings run together (batched by scoring.generate_texts).
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._gen_settings(r.args[1]), []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_gen, temperature), idx in groups.items():
            texts = scoring.generate_texts(self.model, self.tokenizer, [requests[i].args[0] for i in idx],
                                           max_new_tokens=max_gen, stop=until, batch_size=self.batch_size,
                                           temperature=temperature)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", tuple(requests[i].args), text)
        return out

    def _gen_settings(self, gen_kwargs: dict | None) -> tuple[tuple[str, ...], int, float]:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eos = self.tokenizer.eos_token
        if eos and eos not in until:  # as HFLM: the EOS text is a stop string too
            until.append(eos)
        max_gen = next((int(kw[k]) for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if kw.get(k)),
                       DEFAULT_MAX_GEN_TOKS)
        temperature = float(kw.get("temperature") or 0.0)
        if not kw.get("do_sample", temperature > 0):
            temperature = 0.0
        return tuple(until), max_gen, temperature

    # -- chat templates (``--apply_chat_template``)
    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text, _ = self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)
        return text


__all__ = ["LmforgeLM"]
