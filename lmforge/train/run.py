"""From a recipe to a ready Trainer: tokenizer, model (loaded or fresh), LoRA, teacher, datasets."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.models.config import Config
from lmforge.models.model import Transformer
from lmforge.train.recipe import TrainConfig
from lmforge.train.trainer import Data, Trainer


def build_model(cfg: TrainConfig, tokenizer=None) -> Transformer:
    from lmforge.models.checkpoint import load_model

    if cfg.model.path:
        return load_model(cfg.model.path, dtype=torch.float32)
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
    return Transformer(config).init_weights(std=cfg.model.init_std, seed=cfg.seed)


def build_data(cfg: TrainConfig, tokenizer, rank: int = 0, barrier=lambda: None) -> Data:
    if cfg.task == "pretrain":
        from lmforge.data.pretrain import PackedDataset, build_token_cache

        cache_dir = Path(cfg.data.cache_dir or Path(cfg.out_dir).parent / "token_cache")

        def caches_():
            return build_token_cache(cfg.data.train, tokenizer, cache_dir, val_paths=cfg.data.val,
                                     val_fraction=cfg.data.val_fraction, text_field=cfg.data.text_field,
                                     glob=cfg.data.glob, max_docs=cfg.data.max_docs, seed=cfg.seed)

        # Rank 0 tokenizes; the others wait, then find the finished cache.
        if rank == 0:
            caches = caches_()
        barrier()
        if rank != 0:
            caches = caches_()
        train = PackedDataset(caches.train, cfg.data.seq_len)
        val = PackedDataset(caches.val, cfg.data.seq_len) if caches.val is not None else None
        desc = f"{caches.train.num_tokens:,} training tokens in {len(train):,} sequences of {cfg.data.seq_len}"
    elif cfg.task in ("dpo", "rm"):
        from lmforge.align.dpo import PreferenceDataset

        full = PreferenceDataset(cfg.data.train, tokenizer, cfg.data.seq_len)
        if cfg.data.val:
            train, val = full, PreferenceDataset(cfg.data.val, tokenizer, cfg.data.seq_len)
        else:
            train, val = full, full.split_off(int(len(full) * cfg.data.val_fraction))
        desc = f"{len(train):,} preference pairs" + (f" ({full.dropped} dropped: too long)" if full.dropped else "")
    else:
        from lmforge.data.sft import SFTDataset, read_chat_jsonl

        conversations = [c for path in cfg.data.train for c in read_chat_jsonl(path)]
        if cfg.data.val:
            val_conv = [c for path in cfg.data.val for c in read_chat_jsonl(path)]
        else:
            n_val = int(len(conversations) * cfg.data.val_fraction)
            conversations, val_conv = conversations[n_val:], conversations[:n_val]
        train = SFTDataset(conversations, tokenizer, cfg.data.seq_len, truncate=cfg.data.truncate)
        val = SFTDataset(val_conv, tokenizer, cfg.data.seq_len, truncate=cfg.data.truncate) if val_conv else None
        desc = f"{len(train):,} conversations (loss on assistant tokens only"
        if train.truncated or train.dropped:
            desc += f"; {train.truncated} truncated and {train.dropped} dropped at data.seq_len={cfg.data.seq_len}"
        desc += ")"
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return Data(train=train, val=val, pad_id=int(pad if pad is not None else 0), describe=desc)


def build_trainer(cfg: TrainConfig) -> Trainer:
    from lmforge.data.tokenizer import load_tokenizer

    tok_path = cfg.tokenizer or cfg.model.path
    if tok_path is None:
        raise ConfigError("recipe field 'tokenizer' is needed when the model is built from a config")
    tokenizer = load_tokenizer(tok_path)
    model = build_model(cfg, tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise LmforgeError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                           f"{model.config.vocab_size}")
    if cfg.data.seq_len > model.config.max_position_embeddings:
        raise ConfigError(f"recipe field 'data.seq_len' ({cfg.data.seq_len}) exceeds the model's context "
                          f"length ({model.config.max_position_embeddings})")
    lora = None
    if cfg.lora.enabled:
        from lmforge.train.lora import LoraConfig, apply_lora

        lora = LoraConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                          target_modules=tuple(cfg.lora.target_modules), use_dora=cfg.lora.use_dora)
        apply_lora(model, lora)
    teacher = None
    if cfg.distill.teacher:
        from lmforge.models.checkpoint import load_model

        teacher = load_model(cfg.distill.teacher, dtype=torch.float32)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ConfigError(f"distill.teacher has vocabulary {teacher.config.vocab_size}, the student "
                              f"{model.config.vocab_size}; distillation needs a shared tokenizer")
    from lmforge.train.trainer import pick_device, setup_distributed

    # Under torchrun, join the process group now so rank 0 can build the token cache while the others wait.
    procs = setup_distributed(pick_device(cfg.device))
    data = build_data(cfg, tokenizer, rank=procs.rank, barrier=procs.barrier)
    if cfg.task == "rm":
        from lmforge.align.reward_model import RewardModel, RewardObjective

        if lora is not None:
            raise ConfigError("recipe field 'lora.enabled': reward models train all weights for now")
        return Trainer(cfg, RewardModel(model, seed=cfg.seed), data, tokenizer=tokenizer, objective=RewardObjective())
    if cfg.task != "dpo":
        return Trainer(cfg, model, data, tokenizer=tokenizer, teacher=teacher, lora=lora)
    from lmforge.align.dpo import PreferenceObjective, cache_reference_logps

    p = cfg.preference
    objective = PreferenceObjective(p.beta, p.loss_type, p.label_smoothing, p.simpo_gamma, p.nll_weight)
    trainer = Trainer(cfg, model, data, tokenizer=tokenizer, lora=lora, objective=objective)
    if p.loss_type != "simpo":  # SimPO is reference-free
        cache_reference_logps(trainer, [data.train, data.val], objective, batch_size=cfg.batch_size)
    return trainer
