"""A tiny deterministic training run on in-memory data; importable by tests and runnable under torchrun.

    torchrun --nproc_per_node=2 tests/train/tiny_run.py OUT_DIR [key=value ...]
"""

from __future__ import annotations

import sys

import torch

from lmforge.data.sft import IGNORE_INDEX
from lmforge.models.config import Config
from lmforge.models.model import Transformer
from lmforge.train.recipe import load_recipe
from lmforge.train.trainer import Data, Trainer

MODEL = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


class TokenWindows:
    """Sequences from a fixed random-but-structured stream (a repeating pattern with noise), variable masks."""

    def __init__(self, n: int, seq_len: int, seed: int, ragged: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        base = torch.arange(n * (seq_len + 1)) * 7 % 97
        noise = torch.randint(0, 97, base.shape, generator=g)
        keep = torch.rand(base.shape, generator=g) < 0.8
        self.stream = torch.where(keep, base, noise)
        self.n, self.seq_len, self.ragged = n, seq_len, ragged
        self.lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=g)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.stream[i * (self.seq_len + 1):(i + 1) * (self.seq_len + 1)]
        ids, labels = w[:-1].clone(), w[1:].clone()
        if self.ragged:  # SFT-like: different lengths and masked prompt tokens
            n = int(self.lengths[i])
            ids, labels = ids[:n], labels[:n]
            labels[: n // 3] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}


def make_trainer(out_dir: str, overrides: list[str] = (), ragged: bool = False) -> Trainer:
    cfg = load_recipe(None, [f"out_dir={out_dir}", "model.config={}", "data.train=[memory]", "data.seq_len=16",
                             "batch_size=2", "max_steps=6", "eval_every=0", "save_every=3", "progress=false",
                             "plot=false", "optim.lr=3e-3", "optim.warmup_steps=2", *overrides])
    cfg.model.config = dict(MODEL)
    torch.manual_seed(cfg.seed)
    model = Transformer(Config.from_hf(cfg.model.config)).init_weights(std=0.05, seed=cfg.seed)
    lora = None
    if cfg.lora.enabled:
        from lmforge.train.lora import LoraConfig, apply_lora

        lora = LoraConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                          target_modules=tuple(cfg.lora.target_modules), use_dora=cfg.lora.use_dora)
        apply_lora(model, lora)
    data = Data(train=TokenWindows(64, 16, seed=1, ragged=ragged), val=TokenWindows(8, 16, seed=2, ragged=ragged),
                pad_id=0)
    return Trainer(cfg, model, data, lora=lora)


if __name__ == "__main__":
    args = [a for a in sys.argv[2:] if a != "ragged"]
    trainer = make_trainer(sys.argv[1], args, ragged="ragged" in sys.argv[2:])
    trainer.fit()
    if trainer.dist.world > 1:
        torch.distributed.destroy_process_group()
