"""One forward pass over a mixed batch (prefill chunks + decode tokens) with a paged KV pool.

All new tokens of the step are packed into one row [1, N]; projections, norms and MLPs run on it as one
batch, through the model's own ``Block`` modules. Attention gets a duck-typed ``ForwardContext``: each
layer's "cache" is the sequences' KV gathered from their blocks into one buffer [1, K, S, D] (S = the
sum of their context lengths), the new keys/values land at their buffer slots through the model's decode
path (``ctx.slot``), and a block-diagonal causal (and windowed) mask keeps sequences apart. After the
pass the new keys/values are scattered back into the pool. The mask costs O(N * S) per layer, fine for
CPU-sized batches; a varlen / paged attention kernel is the GPU upgrade.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.models.model import Transformer
from lmforge.serve.scheduler import ScheduledSeq


class _Gathered:
    """Per-layer contiguous K (or V) buffers, gathered from the pool on first use in this step."""

    def __init__(self, pools: list[Tensor], ctx_slots: Tensor) -> None:
        self.pools, self.ctx_slots = pools, ctx_slots
        self.buffers: dict[int, Tensor] = {}

    def __getitem__(self, layer: int) -> Tensor:
        if layer not in self.buffers:
            pool = self.pools[layer]
            flat = pool.view(-1, pool.shape[2], pool.shape[3])  # [blocks * block_size, K, D]
            self.buffers[layer] = flat[self.ctx_slots].permute(1, 0, 2).unsqueeze(0)  # [1, K, S, D]
        return self.buffers[layer]


class _PagedCache:
    def __init__(self, k_pool: list[Tensor], v_pool: list[Tensor], ctx_slots: Tensor) -> None:
        self.keys, self.values = _Gathered(k_pool, ctx_slots), _Gathered(v_pool, ctx_slots)


class _PagedContext:
    """Stands in for ``ForwardContext`` on the ``slot`` (decode) path of ``Attention.forward``."""

    def __init__(self, cache: _PagedCache, slot: Tensor, q_seg: Tensor, q_pos: Tensor, k_seg: Tensor,
                 k_pos: Tensor) -> None:
        self.cache, self.slot = cache, slot  # slot: buffer index of each new token [N]
        self.router_logits = None  # MoE: no load-balancing stats at inference
        self.q_seg, self.q_pos, self.k_seg, self.k_pos = q_seg, q_pos, k_seg, k_pos
        self._masks: dict[int | None, Tensor] = {}

    def mask_for(self, window: int | None) -> Tensor:
        if window not in self._masks:
            allowed = (self.q_seg[:, None] == self.k_seg[None]) & (self.k_pos[None] <= self.q_pos[:, None])
            if window is not None:
                allowed &= self.q_pos[:, None] - self.k_pos[None] < window
            self._masks[window] = allowed[None, None]  # [1, 1, N, S]
        return self._masks[window]


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
    def run(self, batch: list[ScheduledSeq], logits_for: list[int] | None = None) -> Tensor:
        """Feed every scheduled chunk; logits [len(logits_for), vocab] at the last fed token of those
        batch entries (default: all of them), float32."""
        model, cfg, bs = self.model, self.model.config, self.block_size
        device = model.device
        ids, q_pos, q_seg, new_idx, ctx_slots, k_pos, k_seg, last = [], [], [], [], [], [], [], []
        offset = n_new = 0
        for i, item in enumerate(batch):
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_tokens
            total = start + n
            ids.extend(seq.tokens[start:total])
            table = torch.tensor(seq.block_table[:-(-total // bs)], dtype=torch.long)
            ctx_slots.append((table[:, None] * bs + torch.arange(bs)).flatten()[:total])
            positions = torch.arange(total)
            k_pos.append(positions)
            k_seg.append(torch.full((total,), i))
            q_pos.append(positions[start:])
            q_seg.append(torch.full((n,), i))
            new_idx.append(positions[start:] + offset)
            offset += total
            n_new += n
            last.append(n_new - 1)
        to = dict(device=device, dtype=torch.long)
        input_ids = torch.tensor(ids, **to)[None]
        ctx_slots_t = torch.cat(ctx_slots).to(device)
        slot = torch.cat(new_idx).to(device)
        positions = torch.cat(q_pos).to(device)
        cache = _PagedCache(self.k_pool, self.v_pool, ctx_slots_t)
        ctx = _PagedContext(cache, slot, torch.cat(q_seg).to(device), positions,
                            torch.cat(k_seg).to(device), torch.cat(k_pos).to(device))

        # The prologue/epilogue of Transformer.forward; the blocks themselves are the model's.
        x = model.model.embed_tokens(input_ids)
        if cfg.embedding_multiplier != 1.0:
            x = x * torch.tensor(cfg.embedding_multiplier, dtype=x.dtype)
        cos = sin = None
        if model.model.embed_positions is not None:
            x = x + model.model.embed_positions(positions[None])
        else:
            cos, sin = model._rope(positions[None], x.dtype)
        for block in model.model.layers:
            x = block(x, cos, sin, ctx)

        # Write this step's keys/values back to their pages.
        new_slots = ctx_slots_t[slot]
        for pools, gathered in ((self.k_pool, cache.keys), (self.v_pool, cache.values)):
            for layer, buf in gathered.buffers.items():
                pool = pools[layer]
                flat = pool.view(-1, pool.shape[2], pool.shape[3])
                flat[new_slots] = buf[0][:, slot].transpose(0, 1)

        rows = last if logits_for is None else [last[j] for j in logits_for]
        h = model.model.norm(x[0, torch.tensor(rows, **to)])
        logits = model.lm_head(h)
        if cfg.final_logit_softcap is not None:
            logits = torch.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits.float()
