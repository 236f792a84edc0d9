"""Training recipes: YAML files that fill typed dataclasses, with ``key.sub=value`` command-line overrides.

A recipe field that does not exist or has the wrong type is an error that names the field, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.errors import ConfigError


@dataclass
class RunSpec:
    """What every run has, whatever it trains (``TrainConfig`` and the RL configs extend it)."""

    seed: int = 0
    device: str = "auto"  # auto (cuda:LOCAL_RANK when there is a GPU, else cpu) | cpu | cuda | cuda:N
    save_every: int = 50  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 1  # metrics.jsonl record every N steps
    progress: bool = True  # a progress bar on the terminal
    plot: bool = True  # loss.png at the end


@dataclass
class ModelSpec:
    path: str | None = None  # an HF directory to start from
    config: dict[str, Any] | None = None  # or an HF-style config.json dict to build a fresh model from
    init_std: float = 0.02
    # QLoRA: a frozen base with weight-only int4/int8 linears (lmforge.models.quant; CPU kernels); needs lora.enabled
    quantize: None | Literal["int4", "int8"] = None  # None first: a bad value is reported against the formats
    # Only parameters whose names match one of these globs train, the rest stay frozen (e.g. a LLaVA's projector:
    # ["multi_modal_projector.*"]); empty: all train (or, with LoRA, the adapters). LoRA adapters always train.
    trainable: list[str] = field(default_factory=list)


@dataclass
class ReplaySpec:
    """Pretraining text mixed into SFT so the model keeps its language modelling (replay against forgetting)."""

    train: list[str] = field(default_factory=list)  # pretraining sources (as data.train of a pretrain recipe)
    fraction: float = 0.0  # share of the training items that are replay windows (0: no replay)
    seq_len: int | None = None  # tokens per replay window; default data.seq_len
    # Documents held out of replay: set it (and seed) as in the pretraining recipe to replay only that run's
    # training split and share its token cache.
    val_fraction: float = 0.0


@dataclass
class DataSpec:
    train: list[str] = field(default_factory=list)  # files or directories (txt/md/py, jsonl, parquet)
    val: list[str] = field(default_factory=list)  # empty: hold out val_fraction of the training documents
    val_fraction: float = 0.02
    text_field: str = "text"
    glob: str = "**/*"
    cache_dir: str | None = None  # token cache; default <out_dir>/../token_cache
    seq_len: int = 256
    max_docs: int | None = None  # cap on documents read (quick experiments)
    truncate: bool = True  # SFT: truncate conversations longer than seq_len (counted) instead of failing
    errors: str = "strict"  # text files that are not UTF-8: "strict" (error naming file and offset) | "replace"
    replay: ReplaySpec = field(default_factory=ReplaySpec)  # SFT only


@dataclass
class OptimSpec:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    fused: bool | None = None  # None: fused AdamW where torch supports it


@dataclass
class LoraSpec:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_dora: bool = False


@dataclass
class DistillSpec:
    teacher: str | None = None  # an HF directory; enables the distillation objective
    temperature: float = 2.0
    kd_weight: float = 0.5  # weight of KL(teacher || student); 1 - kd_weight goes to cross-entropy


@dataclass
class PreferenceSpec:
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"  # DPO, IPO, SimPO
    label_smoothing: float = 0.0  # > 0: conservative DPO
    simpo_gamma: float = 0.5
    nll_weight: float = 0.0  # > 0: add the chosen answer's per-token NLL (DPO+NLL, Pang et al. 2024)


@dataclass
class TrainConfig(RunSpec):
    task: Literal["pretrain", "sft", "dpo", "rm"] = "pretrain"
    out_dir: str = "runs/run"
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: str | None = None  # default: the model directory
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    preference: PreferenceSpec = field(default_factory=PreferenceSpec)
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1
    max_steps: int = 100
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPUs that support it
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"  # used when launched by torchrun with more than one process
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 8

    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"recipe field '{name}' {msg}")

        need(self.model.path is not None or self.model.config is not None, "model",
             "needs 'path' (an HF directory) or 'config' (an HF config dict)")
        need(not (self.model.path and self.model.config), "model", "takes either 'path' or 'config', not both")
        need(bool(self.data.train), "data.train", "must list at least one file or directory")
        need(self.data.seq_len > 1, "data.seq_len", f"must be > 1, got {self.data.seq_len}")
        need(0 <= self.data.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")
        need(0 <= self.data.replay.fraction < 1, "data.replay.fraction", "must be in [0, 1)")
        need(0 <= self.data.replay.val_fraction < 1, "data.replay.val_fraction", "must be in [0, 1)")
        need(self.data.replay.fraction == 0 or bool(self.data.replay.train), "data.replay.train",
             "must list pretraining sources when data.replay.fraction > 0")
        need(self.data.replay.fraction == 0 or self.task == "sft", "data.replay",
             f"mixes pretraining text into SFT; task {self.task!r} does not take it")
        need(self.data.replay.seq_len is None or 1 < self.data.replay.seq_len <= self.data.seq_len,
             "data.replay.seq_len", f"must be in 2..data.seq_len ({self.data.seq_len})")
        need(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        need(self.grad_accum > 0, "grad_accum", f"must be positive, got {self.grad_accum}")
        need(self.max_steps > 0, "max_steps", f"must be positive, got {self.max_steps}")
        need(self.optim.lr > 0, "optim.lr", f"must be positive, got {self.optim.lr}")
        need(0 <= self.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        need(self.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        need(len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas), "optim.betas",
             "must be two numbers in [0, 1)")
        need(self.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        need(self.save_every >= 0, "save_every", "must be >= 0")
        need(self.lora.r > 0, "lora.r", f"must be positive, got {self.lora.r}")
        need(self.lora.alpha > 0, "lora.alpha", "must be positive")
        need(0 <= self.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
        need(self.distill.temperature > 0, "distill.temperature", "must be positive")
        need(0 <= self.distill.kd_weight <= 1, "distill.kd_weight", "must be in [0, 1]")
        need(self.preference.beta > 0, "preference.beta", "must be positive")
        need(0 <= self.preference.label_smoothing < 0.5, "preference.label_smoothing", "must be in [0, 0.5)")
        need(self.preference.nll_weight >= 0, "preference.nll_weight", "must be >= 0")


# ---- typed loading ---------------------------------------------------------------------------------
def _check(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check(value, option, name)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1]
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"recipe field '{name}' must be null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"recipe field '{name}' must be one of {list(typing.get_args(tp))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"recipe field '{name}' must be a mapping, got {value!r}")
        return _build(tp, value, name + ".")
    if origin is list:
        if isinstance(value, str) and typing.get_args(tp)[0] is str:
            value = [value]  # a single path is a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"recipe field '{name}' must be a list, got {value!r}")
        return [_check(v, typing.get_args(tp)[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"recipe field '{name}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 3e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"recipe field '{name}' must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown recipe field '{prefix}{unknown[0]}'; "
                          f"{prefix.rstrip('.') or 'the top level'} has: {', '.join(sorted(names))}")
    return cls(**{k: _check(v, hints[k], prefix + k) for k, v in values.items()})


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = tree.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a mapping")
        tree = node
    tree[keys[-1]] = value


def _merge(tree: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, defaults: dict[str, Any] | None = None,
                cls: type = TrainConfig, values: dict[str, Any] | None = None) -> Any:
    """A validated ``cls`` (TrainConfig, GRPOConfig, ...) from, each over the one before: its defaults, the
    ``defaults`` mapping, a YAML recipe file, ``key.sub=value`` overrides (values parsed as YAML), and ``values``
    (dotted keys to values, e.g. flags given on the command line)."""
    tree: dict[str, Any] = copy.deepcopy(defaults or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must be a mapping of fields, got {type(loaded).__name__}")
        _merge(tree, loaded)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set(tree, key.strip(), value)
    for key, value in (values or {}).items():
        _set(tree, key, value)
    config = _build(cls, tree)
    config.validate()
    return config


def recipe_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
