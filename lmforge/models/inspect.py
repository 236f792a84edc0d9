"""Describe a checkpoint from its config.json and safetensors headers, without loading weights."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from lmforge.errors import CheckpointError
from lmforge.models.checkpoint import _TensorSource, read_config


_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else str(int(n))
        n /= 1000
    return f"{n:.1f}T"


def describe(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    config = read_config(path)
    source = _TensorSource(path)
    dtypes: Counter[str] = Counter()
    stored = 0
    for file in sorted(set(source.files.values())):
        try:
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    dtypes[sl.get_dtype()] += n
                    stored += n
        except SafetensorError as e:
            raise CheckpointError(f"{file}: cannot read safetensors header ({e})") from None
    params = config.num_params()
    arch = (config.hf_extra.get("architectures") or [config.model_type])[0]
    info: dict[str, Any] = {
        "architecture": f"{arch} ({config.model_type})",
        "parameters": f"{_human(params)} ({params:,}; {_human(config.num_params(include_embeddings=False))} non-embedding)",
        "dtype": ", ".join(_DTYPE_NAMES.get(d, d.lower()) for d, _ in dtypes.most_common()),
        "context_length": config.max_position_embeddings,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "heads": (f"{config.num_heads} query / {config.num_kv_heads} kv, head_dim {config.head_dim}"
                  if not config.layer_num_heads else
                  f"per layer {min(config.layer_num_heads)}..{max(config.layer_num_heads)} query / "
                  f"{min(config.layer_num_kv_heads)}..{max(config.layer_num_kv_heads)} kv, head_dim {config.head_dim}"),
        "ffn": (f"{config.mlp} {config.activation}, width {config.intermediate_size}" if not config.layer_intermediate_size
                else f"{config.mlp} {config.activation}, width {min(config.layer_intermediate_size)}.."
                     f"{max(config.layer_intermediate_size)} per layer"),
        "vocab_size": config.vocab_size,
        "positions": (f"rope theta={config.rope_theta:g}" + (f" scaling={config.rope_scaling['rope_type']}"
                      if config.rope_scaling else "")) if config.position_embedding == "rope" else "learned",
        "tied_embeddings": config.tie_embeddings,
        "files": f"{len(set(source.files.values()))} safetensors file(s), {_human(stored)} stored values",
        "tokenizer": "yes" if (path / "tokenizer.json").is_file() else "no tokenizer.json",
    }
    if config.sliding_window:
        layers = [i for i in range(config.num_layers) if config.window(i)]
        info["sliding_window"] = f"{config.sliding_window} on {len(layers)}/{config.num_layers} layers"
    if config.num_experts:
        info["experts"] = f"top-{config.num_experts_per_tok} of {config.num_experts}"
    if config.attn_logit_softcap or config.final_logit_softcap:
        info["softcap"] = f"attention {config.attn_logit_softcap}, final {config.final_logit_softcap}"
    return info
