"""Scalar reward models: a Transformer backbone plus a linear head read at each row's last real token.

The model and its checkpoint format live in the model layer so that everything above it (the engine's
test-time strategies, serving, evaluation) can load and score with a reward model; training it
(Bradley-Terry objective, the ``rm`` recipe task) lives in ``lmforge.align.reward_model``.

On disk a reward model is an ordinary HF checkpoint directory (the backbone, loadable by itself) plus
``reward_head.safetensors`` and a ``reward_model.json`` marker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.io import atomic_directory
from lmforge.models.config import Config
from lmforge.models.model import Transformer

HEAD_FILE = "reward_head.safetensors"
MARKER_FILE = "reward_model.json"


class RewardModel(nn.Module):
    """``forward(ids, attention_mask)`` -> one reward per row ``[B]`` (float32)."""

    def __init__(self, backbone: Transformer, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        # No bias: Bradley-Terry only sees reward differences, so a constant offset is never learned.
        self.head = nn.Linear(backbone.config.hidden_size, 1, bias=False)
        # Its own generator: the head is the same for a seed whatever consumed the global RNG before.
        nn.init.normal_(self.head.weight, std=backbone.config.hidden_size ** -0.5,
                        generator=torch.Generator().manual_seed(seed))
        self.head.to(device=backbone.device, dtype=backbone.model.embed_tokens.weight.dtype)

    # The training engine treats its model as a Transformer: expose what it reads and sets.
    @property
    def config(self) -> Config:
        return self.backbone.config

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def gradient_checkpointing(self) -> bool:
        return self.backbone.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.backbone.gradient_checkpointing = value

    def aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.backbone.aux_loss(attention_mask)

    # Training-engine hooks: a checkpoint's model directory holds the backbone (HF format) plus the head.
    @staticmethod
    def write_checkpoint_model(state: dict[str, torch.Tensor], config: Config, path: Path, tokenizer: Any = None) -> None:
        with torch.device("meta"):
            rm = RewardModel(Transformer(config))
        rm.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=True, assign=True)
        if config.tie_embeddings:
            rm.backbone.lm_head.weight = rm.backbone.model.embed_tokens.weight
        save_reward_model(rm, path, tokenizer=tokenizer)

    @staticmethod
    def read_checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
        return load_reward_model(path).state_dict()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone(input_ids, attention_mask, return_hidden=True)  # [B, T, H]
        b, t = input_ids.shape
        if attention_mask is None:
            last = torch.full((b,), t - 1, dtype=torch.long, device=hidden.device)
        else:
            if not bool(attention_mask.any(-1).all()):
                raise LmforgeError("a row of the batch has no real token (attention_mask all zero)")
            # Index of the last 1 in each row: correct for right padding (and for left padding too).
            positions = torch.arange(t, device=attention_mask.device)
            last = (attention_mask.bool() * positions).argmax(-1).to(hidden.device)
        picked = hidden[torch.arange(b, device=hidden.device), last]  # [B, H]
        return self.head(picked).squeeze(-1).float()

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards in eval mode without gradients (moved to the model's device)."""
        was_training = self.training
        self.eval()
        try:
            mask = None if attention_mask is None else attention_mask.to(self.device)
            return self(input_ids.to(self.device), mask)
        finally:
            self.train(was_training)



# ---- checkpoints -----------------------------------------------------------------------------------
def save_reward_model(rm: RewardModel, path: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write the backbone as an HF directory plus the head; the whole directory appears atomically."""
    from lmforge.models.checkpoint import save_model

    path = Path(path)
    with atomic_directory(path) as tmp:
        save_model(rm.backbone, tmp, tokenizer=tokenizer)  # replaces the (empty) temp dir in one rename
        save_file({"weight": rm.head.weight.detach().cpu().contiguous()}, tmp / HEAD_FILE,
                  metadata={"format": "pt"})
        marker = {"type": "reward_model", "head": HEAD_FILE, "hidden_size": rm.config.hidden_size,
                  "readout": "last_real_token"}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2))
    return path


def load_reward_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> RewardModel:
    from lmforge.models.checkpoint import load_model

    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"reward model directory {path} does not exist")
    head_file = path / HEAD_FILE
    if not head_file.is_file():
        raise LmforgeError(f"{path} has no {HEAD_FILE}: it is a language-model checkpoint, not a reward model "
                           "(save it with save_reward_model)")
    backbone = load_model(path, dtype=dtype, device=device)
    rm = RewardModel(backbone)
    weight = load_file(head_file).get("weight")
    want = (1, rm.config.hidden_size)
    if weight is None or tuple(weight.shape) != want:
        got = "no 'weight' tensor" if weight is None else f"shape {list(weight.shape)}"
        raise LmforgeError(f"{head_file}: expected a 'weight' tensor of shape {list(want)}, found {got}")
    with torch.no_grad():
        rm.head.weight.copy_(weight.to(dtype=rm.head.weight.dtype))
    return rm.eval()


__all__ = ["HEAD_FILE", "MARKER_FILE", "RewardModel", "load_reward_model", "save_reward_model"]
