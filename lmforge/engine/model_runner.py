"""One forward pass over a mixed batch (prefill chunks + decode tokens) with a paged KV pool.

The runner prepares metadata and calls the model's one forward pass; it never re-implements it. All new
tokens of the step are packed into one row [1, N]; projections, norms and MLPs run on it as one batch.
The model asks its KV store for an attention step: here ``PagedStep``, with which each layer writes the
step's new keys/values straight into their pool slots, then attends per sequence over keys gathered from
that sequence's blocks only, so the cost is the sum of each sequence's (new tokens x context), not (all new
tokens x all contexts):
  - decode tokens (one query each) run as one padded batch [B, H, 1, D] over [B, K, S_max, D];
  - each prefill chunk runs alone: queries [1, H, n, D] over its own context, causal from its offset.
A varlen / paged attention kernel (FlashAttention, FlexAttention) is the GPU upgrade of the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.models.model import Transformer


@dataclass
class Feed:
    """What one sequence runs this step: ``tokens`` at positions ``start``.. (their KV lands in the blocks of
    ``block_table``), and how many of the last fed positions want logits: 0 (a prefill chunk that does not
    finish the prompt), 1 (the next token) or k + 1 (verifying k draft tokens)."""

    tokens: list[int]
    start: int
    block_table: list[int]
    num_logits: int = 1


class _Chunk:
    """One prefill chunk: queries at rows [row, row + n) of the step; its context is the first
    ``start + n`` slots of the blocks ``blocks``."""

    def __init__(self, row: int, n: int, start: int, blocks: Tensor) -> None:
        self.row, self.n, self.start, self.blocks = row, n, start, blocks
        self.masks: dict[int | None, Tensor | None] = {}

    def mask_for(self, window: int | None) -> Tensor | None:
        total = self.start + self.n
        if window is not None and total <= window:
            window = None  # cannot bite
        if window not in self.masks:
            if self.start == 0 and window is None:
                self.masks[window] = None  # plain causal
            else:
                q = torch.arange(self.start, total, device=self.blocks.device)[:, None]
                k = torch.arange(total, device=self.blocks.device)[None]
                allowed = k <= q
                if window is not None:
                    allowed &= q - k < window
                self.masks[window] = allowed[None, None]
        return self.masks[window]


class PagedStep:
    """The model's ``AttentionStep`` (see ``lmforge.models.model``) over the paged pool, for one engine step."""

    def __init__(self, positions: Tensor, k_pool: list[Tensor], v_pool: list[Tensor], new_slots: Tensor,
                 decode_rows: Tensor, decode_blocks: Tensor, decode_valid: Tensor, decode_pos: Tensor,
                 chunks: list[_Chunk]) -> None:
        self.positions = positions  # [1, N]
        self.k_pool, self.v_pool, self.new_slots = k_pool, v_pool, new_slots  # new_slots: pool slot per new token [N]
        self.decode_rows, self.decode_blocks = decode_rows, decode_blocks  # [B], [B, blocks_max] (padding -> block 0)
        self.decode_valid, self.decode_pos = decode_valid, decode_pos  # [B, S_max] bool, [B] query positions
        self.chunks = chunks
        self._decode_masks: dict[int | None, Tensor] = {}

    def _decode_mask(self, window: int | None) -> Tensor:
        if window not in self._decode_masks:
            allowed = self.decode_valid
            if window is not None:
                k_pos = torch.arange(allowed.shape[1], device=allowed.device)[None]
                allowed = allowed & (self.decode_pos[:, None] - k_pos < window)
            self._decode_masks[window] = allowed[:, None, None, :]  # [B, 1, 1, S_max]
        return self._decode_masks[window]

    def begin(self, attention_mask: Tensor) -> "PagedStep":
        return self

    def attend(self, attn, q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        k_pool, v_pool = self.k_pool[layer], self.v_pool[layer]  # [blocks, block_size, K, D]
        k_pool.flatten(0, 1).index_copy_(0, self.new_slots, k[0].transpose(0, 1))
        v_pool.flatten(0, 1).index_copy_(0, self.new_slots, v[0].transpose(0, 1))
        # Gather whole blocks (index_select copies contiguous block_size * K * D runs), not single slots.
        y = torch.empty_like(q)
        if self.decode_rows.numel():
            b, s_max = self.decode_valid.shape
            qd = q[0][:, self.decode_rows].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
            blocks = self.decode_blocks.flatten()
            kd = k_pool.index_select(0, blocks).view(b, s_max, *k_pool.shape[2:]).transpose(1, 2)  # [B, K, S_max, D]
            vd = v_pool.index_select(0, blocks).view(b, s_max, *v_pool.shape[2:]).transpose(1, 2)
            yd = attn.attention(qd, kd, vd, self._decode_mask(attn.window))
            y[0][:, self.decode_rows] = yd.squeeze(2).transpose(0, 1)
        for c in self.chunks:
            total = c.start + c.n
            kc = k_pool.index_select(0, c.blocks).flatten(0, 1)[:total].transpose(0, 1).unsqueeze(0)  # [1, K, total, D]
            vc = v_pool.index_select(0, c.blocks).flatten(0, 1)[:total].transpose(0, 1).unsqueeze(0)
            mask = c.mask_for(attn.window)
            y[:, :, c.row:c.row + c.n] = attn.attention(q[:, :, c.row:c.row + c.n], kc, vc, mask, causal=mask is None)
        return y


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int) -> None:
        self.model, self.block_size, self.num_blocks = model, block_size, num_blocks
        cfg, device, dtype = model.config, model.device, model.dtype
        shapes = [(num_blocks, block_size, cfg.kv_heads(i), cfg.head_dim) for i in range(cfg.num_layers)]
        self.k_pool = [torch.zeros(s, device=device, dtype=dtype) for s in shapes]
        self.v_pool = [torch.zeros(s, device=device, dtype=dtype) for s in shapes]

    @staticmethod
    def bytes_per_block(model: Transformer, block_size: int) -> int:
        cfg = model.config
        per_token = sum(2 * cfg.kv_heads(i) * cfg.head_dim for i in range(cfg.num_layers))
        return per_token * block_size * model.dtype.itemsize

    @torch.inference_mode()
    def run(self, feeds: list[Feed]) -> Tensor:
        """Run every feed in one pass; float32 logits [sum of num_logits, vocab], feed by feed."""
        model, bs = self.model, self.block_size
        device = model.device
        ids, q_pos, new_slots, rows = [], [], [], []
        decode_rows, decode_tables, decode_lens, chunks = [], [], [], []
        row = 0
        for feed in feeds:
            start, n = feed.start, len(feed.tokens)
            total = start + n
            ids.extend(feed.tokens)
            table = torch.tensor(feed.block_table[:-(-total // bs)], dtype=torch.long)
            slots = (table[:, None] * bs + torch.arange(bs)).flatten()[:total]
            new_slots.append(slots[start:])
            q_pos.append(torch.arange(start, total))
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(table)
                decode_lens.append(total)
            else:
                chunks.append(_Chunk(row, n, start, table.to(device)))
            row += n
            rows.extend(range(row - feed.num_logits, row))
        to = dict(device=device, dtype=torch.long)
        input_ids = torch.tensor(ids, **to)[None]
        positions = torch.cat(q_pos).to(device)
        width = max((len(x) for x in decode_tables), default=0)
        padded = torch.zeros(len(decode_tables), width, dtype=torch.long)
        for i, x in enumerate(decode_tables):
            padded[i, :len(x)] = x
        lens = torch.tensor(decode_lens, dtype=torch.long)
        valid = torch.arange(width * bs)[None] < lens[:, None]
        step = PagedStep(positions[None], self.k_pool, self.v_pool, torch.cat(new_slots).to(device),
                         torch.tensor(decode_rows, **to), padded.to(device), valid.to(device), (lens - 1).to(device),
                         chunks)
        return model(input_ids, cache=step, logits_to_keep=torch.tensor(rows, **to))[0].float()
