"""From a recipe to a ready Trainer: tokenizer, model (loaded or fresh), LoRA, teacher, and the datasets and
trainer of its ``task`` (a registry: pretrain and sft here, the others registered by the packages above)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.models.checkpoint import config_model_type
from lmforge.models.config import Config
from lmforge.models.device import pick_device
from lmforge.models.llava import text_decoder
from lmforge.models.vision import VISION_LANGUAGE_MODEL_TYPES
from lmforge.models.model import Transformer
from lmforge.train.harness import Dist, setup_distributed
from lmforge.train.recipe import TrainConfig
from lmforge.train.trainer import Data, Trainer


def build_model(cfg: TrainConfig, tokenizer=None) -> Transformer:
    from lmforge.models.checkpoint import load_model

    if cfg.model.quantize and not cfg.lora.enabled:
        raise ConfigError(f"recipe field 'model.quantize' ({cfg.model.quantize}) needs lora.enabled: true (QLoRA): "
                          "nothing in a quantized base is trainable, only adapters over it")
    if cfg.model.quantize and pick_device(cfg.device).type != "cpu":
        raise ConfigError(f"recipe field 'model.quantize' ({cfg.model.quantize}): the low-bit kernels are CPU "
                          f"kernels; train QLoRA with device: cpu (device {cfg.device!r} resolves to "
                          f"{pick_device(cfg.device)})")
    vision_language = config_model_type(cfg.model.path) if cfg.model.quantize and cfg.model.path else None
    if vision_language in VISION_LANGUAGE_MODEL_TYPES:
        # load_model quantizes its decoder, but merging the adapters into a quantized vision-language model (at
        # every checkpoint) is not supported: refused here, not after the first stretch of training
        raise ConfigError(f"recipe field 'model.quantize' ({cfg.model.quantize}): QLoRA of a vision-language model "
                          f"({vision_language}) is not supported yet; train LoRA over its float weights (drop "
                          "model.quantize)")
    if cfg.model.path:
        return load_model(cfg.model.path, dtype=torch.float32, quantize=cfg.model.quantize)
    hf = dict(cfg.model.config or {})
    if tokenizer is not None:
        # A fresh model takes its special ids from the tokenizer; a chat template's end-of-turn token also
        # ends generation (it lands in generation_config.json, where load_tokenizer picks it up).
        stops = list(tokenizer.eos_ids)
        end_of_turn = tokenizer.backend.token_to_id("<|im_end|>") if tokenizer.chat_template else None
        if end_of_turn is not None and end_of_turn not in stops:
            stops.append(end_of_turn)
        hf.setdefault("bos_token_id", tokenizer.bos_id)
        hf.setdefault("eos_token_id", stops[0] if len(stops) == 1 else stops)
        hf.setdefault("pad_token_id", tokenizer.pad_id)
    config = Config.from_hf(hf)
    torch.manual_seed(cfg.seed)
    model = Transformer(config).init_weights(std=cfg.model.init_std, seed=cfg.seed)
    if cfg.model.quantize:
        from lmforge.models.quant import quantize_model

        quantize_model(model, cfg.model.quantize)
    return model


# ---- tasks: what a recipe's ``task`` trains on, and with which trainer ----------------------------------
DataFn = Callable[[TrainConfig, Any, Dist], tuple[Any, Any, str]]  # (cfg, tokenizer, processes) -> train, val, text
TASKS: dict[str, tuple[DataFn, Callable[..., Trainer]]] = {}


def register_task(name: str, data: DataFn, trainer: Callable[..., Trainer] = Trainer) -> None:
    """Make ``task: name`` buildable; ``trainer(cfg, model, data, tokenizer=, lora=, teacher=)``. Packages above
    ``train`` register theirs when imported (``lmforge.align`` adds ``dpo`` and ``rm``), so it needs none of them."""
    TASKS[name] = (data, trainer)


def _token_caches(cfg: TrainConfig, tokenizer, procs: Dist, paths: list[str], val_fraction: float,
                  val_paths: list[str] = ()):
    """The token caches of ``paths`` (see ``build_token_cache``): rank 0 tokenizes, the others wait, then find
    the finished cache."""
    from lmforge.data.pretrain import build_token_cache

    cache_dir = Path(cfg.data.cache_dir or Path(cfg.out_dir).parent / "token_cache")

    def caches_():
        return build_token_cache(paths, tokenizer, cache_dir, val_paths=val_paths, val_fraction=val_fraction,
                                 text_field=cfg.data.text_field, glob=cfg.data.glob, max_docs=cfg.data.max_docs,
                                 seed=cfg.seed, errors=cfg.data.errors)

    if procs.main:
        caches = caches_()
    procs.barrier()
    if not procs.main:
        caches = caches_()
    return caches


def _pretrain_data(cfg: TrainConfig, tokenizer, procs: Dist) -> tuple[Any, Any, str]:
    from lmforge.data.pretrain import PackedDataset

    caches = _token_caches(cfg, tokenizer, procs, cfg.data.train, cfg.data.val_fraction, cfg.data.val)
    train = PackedDataset(caches.train, cfg.data.seq_len)
    val = PackedDataset(caches.val, cfg.data.seq_len) if caches.val is not None else None
    return train, val, f"{caches.train.num_tokens:,} training tokens in {len(train):,} sequences of {cfg.data.seq_len}"


def freeze_except(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Train only the parameters whose names match one of the glob ``patterns`` (and LoRA adapters, which are
    trainable already); returns the trainable names. A pattern matching no parameter is a ``ConfigError``."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        tops = sorted({".".join(n.split(".")[:2]) for n in names})
        raise ConfigError(f"recipe field 'model.trainable': {unmatched[0]!r} matches no parameter; the model's "
                          f"parameters start with: {', '.join(tops[:12])}")
    for name, param in model.named_parameters():
        adapter = "lora_" in name and param.requires_grad
        param.requires_grad_(adapter or any(fnmatch.fnmatchcase(name, p) for p in patterns))
    return [name for name, param in model.named_parameters() if param.requires_grad]


def _vision_sft_data(cfg: TrainConfig, tokenizer) -> tuple[Any, Any, str]:
    """SFT of a vision-language model: chat JSONL with images (``lmforge.data.vision_sft``), through the model
    directory's processor."""
    from lmforge.data.image_processor import load_processor
    from lmforge.data.vision_sft import VisionSFTDataset, read_vision_chat_jsonl

    if cfg.data.replay.fraction > 0:
        raise ConfigError("recipe field 'data.replay': replay of pretraining text is for text models; this model "
                          "takes images (set data.replay.fraction: 0)")
    processor = load_processor(cfg.model.path)
    processor.tokenizer = tokenizer  # the recipe's tokenizer (by default the model directory's)
    train, val, overflow = _sft_datasets(
        cfg, read_vision_chat_jsonl,
        lambda records: VisionSFTDataset(records, processor, cfg.data.seq_len, truncate=cfg.data.truncate))
    images = sum(len(it["images"]) for it in train.items)
    return train, val, (f"{len(train):,} conversations with {images:,} images ({processor.tokens_per_image} decoder "
                        f"position(s) each; loss on assistant tokens only{overflow})")


def _sft_datasets(cfg: TrainConfig, read: Callable[[str], list], make: Callable[[list], Any]) -> tuple[Any, Any, str]:
    """The training and validation datasets ``make(records)`` of ``data.train`` (and ``data.val``, else the first
    ``val_fraction`` of the records) as ``read(path)`` gives them, and what was truncated or dropped to fit."""
    records = [r for path in cfg.data.train for r in read(path)]
    if cfg.data.val:
        val_records = [r for path in cfg.data.val for r in read(path)]
    else:
        n_val = int(len(records) * cfg.data.val_fraction)
        records, val_records = records[n_val:], records[:n_val]
    train = make(records)
    val = make(val_records) if val_records else None
    overflow = ""
    if train.truncated or train.dropped:
        overflow = f"; {train.truncated} truncated and {train.dropped} dropped at data.seq_len={cfg.data.seq_len}"
    return train, val, overflow


def _sft_data(cfg: TrainConfig, tokenizer, procs: Dist) -> tuple[Any, Any, str]:
    from lmforge.data.sft import SFTDataset, read_chat_jsonl

    if cfg.model.path and config_model_type(cfg.model.path) in VISION_LANGUAGE_MODEL_TYPES:
        return _vision_sft_data(cfg, tokenizer)
    train, val, overflow = _sft_datasets(
        cfg, read_chat_jsonl, lambda convs: SFTDataset(convs, tokenizer, cfg.data.seq_len, truncate=cfg.data.truncate))
    desc = f"{len(train):,} conversations (loss on assistant tokens only{overflow})"
    replay = cfg.data.replay
    if replay.fraction > 0:
        from lmforge.data.pretrain import PackedDataset
        from lmforge.data.sft import ReplayMixture

        caches = _token_caches(cfg, tokenizer, procs, replay.train, replay.val_fraction)
        seq_len = replay.seq_len or cfg.data.seq_len
        train = ReplayMixture(train, PackedDataset(caches.train, seq_len), replay.fraction, seed=cfg.seed)
        desc += (f" + {len(train.replay_index):,} replay windows of {seq_len} pretraining tokens "
                 f"({replay.fraction:.0%} of the mix{f', windows repeated up to {train.repeats + 1}x' if train.repeats else ''})")
    return train, val, desc


register_task("pretrain", _pretrain_data)
register_task("sft", _sft_data)


def build_trainer(cfg: TrainConfig) -> Trainer:
    from lmforge.data.tokenizer import load_tokenizer

    task = TASKS.get(cfg.task)
    if task is None:
        raise ConfigError(f"recipe field 'task': {cfg.task!r} is not available until the package that provides it "
                          "is imported (lmforge.align provides dpo and rm; the lmforge command line imports it)")
    tok_path = cfg.tokenizer or cfg.model.path
    if tok_path is None:
        raise ConfigError("recipe field 'tokenizer' is needed when the model is built from a config")
    tokenizer = load_tokenizer(tok_path)
    model = build_model(cfg, tokenizer)
    rows = text_decoder(model).config.embedding_rows  # Mllama's image token is an input-only id past the head's
    if tokenizer.vocab_size > rows:
        raise LmforgeError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model embeds {rows}")
    if cfg.data.seq_len > model.config.max_position_embeddings:
        raise ConfigError(f"recipe field 'data.seq_len' ({cfg.data.seq_len}) exceeds the model's context "
                          f"length ({model.config.max_position_embeddings})")
    lora = None
    if cfg.lora.enabled:
        from lmforge.train.lora import LoraConfig, apply_lora

        lora = LoraConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                          target_modules=tuple(cfg.lora.target_modules), use_dora=cfg.lora.use_dora)
        torch.manual_seed(cfg.seed)  # the adapters' initial values follow the recipe's seed, loaded base or not
        wrapped = apply_lora(text_decoder(model), lora)  # a vision-language model's decoder; never its vision tower
        for name, param in model.named_parameters():  # the rest of a vision-language model is frozen too
            param.requires_grad_(param.requires_grad and "lora_" in name)
        cross = [name for name in wrapped if ".cross_attn." in name]
        if cross:  # refused now, not at the first checkpoint: PEFT's format has no names for these
            raise ConfigError(f"recipe field 'lora.target_modules' adapts cross-attention layers ({cross[0]}, ...), which "
                              "the PEFT adapter format cannot name; train them whole with model.trainable instead")
    if cfg.model.trainable:
        freeze_except(model, cfg.model.trainable)
    teacher = None
    if cfg.distill.teacher:
        from lmforge.models.checkpoint import load_model

        teacher = load_model(cfg.distill.teacher, dtype=torch.float32)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ConfigError(f"distill.teacher has vocabulary {teacher.config.vocab_size}, the student "
                              f"{model.config.vocab_size}; distillation needs a shared tokenizer")
    # Under torchrun, join the process group now so rank 0 can build the token cache while the others wait.
    procs = setup_distributed(pick_device(cfg.device))
    data_fn, trainer = task
    train, val, describe = data_fn(cfg, tokenizer, procs)
    data = Data(train=train, val=val, pad_id=tokenizer.pad_id_or_eos, describe=describe,
                collate=getattr(train, "collate", None))
    return trainer(cfg, model, data, tokenizer=tokenizer, lora=lora, teacher=teacher)
