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

``QuantizedModelRunner`` keeps the same paged layout with quantized blocks (KIVI 2/4-bit or int8, see
``kv_quant``) and a small float staging pool for the blocks still in the full-precision window.

Steering (``Feed.steering``): per steered layer one additive tensor [1, N, d] holds each steered feed's
``scale * direction`` on that feed's rows and zeros elsewhere, added at ``blocks.{i}.hook_resid_post``; a
step in which no feed steers passes no hooks at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.engine.kv_quant import KVQuantFormat
from lmforge.models.model import Hook, Transformer
from lmforge.models.steering import HOOK_POINT, Steering


# Feeds of at most this many tokens (decode steps, speculative verifications) attend as one padded batch; longer
# ones (prefill chunks) each over their own context.
SHORT_FEED_TOKENS = 8


@dataclass
class Feed:
    """What one sequence runs this step: ``tokens`` at positions ``start``.. (their KV lands in the blocks of
    ``block_table``), and how many of the last fed positions want logits: 0 (a prefill chunk that does not
    finish the prompt), 1 (the next token) or k + 1 (verifying k draft tokens)."""

    tokens: list[int]
    start: int
    block_table: list[int]
    num_logits: int = 1
    steering: Steering | None = None  # added to this feed's rows only
    # image features spliced in (LLaVA): (offsets into ``tokens`` [k], their embeddings [k, hidden]); None: text only
    image_rows: tuple[Tensor, Tensor] | None = None


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
                 decode_rows: Tensor | slice, decode_blocks: Tensor, decode_valid: Tensor, decode_pos: Tensor,
                 chunks: list[_Chunk], decode_real: Tensor | None = None) -> None:
        self.positions = positions  # [1, N]
        self.k_pool, self.v_pool, self.new_slots = k_pool, v_pool, new_slots  # new_slots: pool slot per new token [N]
        # The batched rows: decode tokens and other short feeds (a speculative verification's k + 1 tokens), each
        # sequence's queries over its own gathered blocks. decode_rows: their rows of the step, [B] (one query
        # each), [B, n_max] (up to n_max each; ``decode_real`` [B, n_max] marks the real ones, padding repeats a
        # row) or, packed first with one query each, a slice, which reads and writes them as a view.
        self.decode_rows, self.decode_blocks = decode_rows, decode_blocks  # ..., [B, blocks_max] (padding -> block 0)
        # [B, S_max] bool, and the query positions: [B] or [B, n_max]
        self.decode_valid, self.decode_pos, self.decode_real = decode_valid, decode_pos, decode_real
        self.chunks = chunks
        self._decode_masks: dict[int | None, Tensor] = {}

    def _decode_mask(self, window: int | None) -> Tensor:
        """[B, 1, n, S_max]: a query sees its sequence's keys up to its own position (within the window)."""
        if window not in self._decode_masks:
            pos = self.decode_pos if self.decode_pos.dim() == 2 else self.decode_pos[:, None]  # [B, n]
            k_pos = torch.arange(self.decode_valid.shape[1], device=pos.device)
            allowed = self.decode_valid[:, None, :] & (k_pos <= pos[..., None])
            if window is not None:
                allowed = allowed & (pos[..., None] - k_pos < window)
            self._decode_masks[window] = allowed[:, None]
        return self._decode_masks[window]

    def begin(self, attention_mask: Tensor) -> "PagedStep":
        return self

    def attend(self, attn, q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        k_pool, v_pool = self.k_pool[layer], self.v_pool[layer]  # [blocks, block_size, K, D]
        k_pool.flatten(0, 1).index_copy_(0, self.new_slots, k[0].transpose(0, 1))
        v_pool.flatten(0, 1).index_copy_(0, self.new_slots, v[0].transpose(0, 1))
        # Gather whole blocks (index_select copies contiguous block_size * K * D runs), not single slots.
        y = torch.empty_like(q)
        b, s_max = self.decode_valid.shape
        if b:
            rows = self.decode_rows
            several = isinstance(rows, Tensor) and rows.dim() == 2
            qd = q[0][:, rows].transpose(0, 1)  # [B, H, n_max, D] or [B, H, D]
            qd = qd if several else qd.unsqueeze(2)
            blocks = self.decode_blocks.flatten()
            kd = k_pool.index_select(0, blocks).view(b, s_max, *k_pool.shape[2:]).transpose(1, 2)  # [B, K, S_max, D]
            vd = v_pool.index_select(0, blocks).view(b, s_max, *v_pool.shape[2:]).transpose(1, 2)
            yd = attn.attention(qd, kd, vd, self._decode_mask(attn.window))
            if several:
                y[0][:, rows[self.decode_real]] = yd.transpose(0, 1)[:, self.decode_real]
            else:
                y[0][:, rows] = yd.squeeze(2).transpose(0, 1)
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

    def kv_cache_bytes(self) -> int:
        """Bytes the KV pool holds (every layer, keys and values)."""
        return sum(t.nbytes for t in (*self.k_pool, *self.v_pool))

    @torch.inference_mode()
    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's keys and values in every layer (a forked sequence's partly filled last block)."""
        for pool in (*self.k_pool, *self.v_pool):
            pool[dst].copy_(pool[src])

    @torch.inference_mode()
    def run(self, feeds: list[Feed]) -> Tensor:
        """Run every feed in one pass; float32 logits [sum of num_logits, vocab], feed by feed."""
        model, bs = self.model, self.block_size
        device = model.device
        ids, q_pos, new_slots = [], [], []
        decode_tables, decode_lens, chunks = [], [], []
        # Short feeds (decode tokens, speculative verifications) are packed first and attend as one batch; with one
        # token each, every layer reads and writes their rows as one slice.
        order = sorted(range(len(feeds)), key=lambda i: len(feeds[i].tokens) > SHORT_FEED_TOKENS)
        feed_rows: list[range] = [range(0)] * len(feeds)
        short_rows: list[range] = []
        row = 0
        # Metadata in plain Python lists, one tensor each at the end: a step of 128 decode feeds would otherwise
        # build hundreds of tiny tensors.
        for i in order:
            feed = feeds[i]
            start, n = feed.start, len(feed.tokens)
            total = start + n
            ids.extend(feed.tokens)
            table = feed.block_table[:-(-total // bs)]
            new_slots.extend(table[p // bs] * bs + p % bs for p in range(start, total))
            q_pos.extend(range(start, total))
            if n <= SHORT_FEED_TOKENS:
                short_rows.append(range(row, row + n))
                decode_tables.append(table)
                decode_lens.append(total)
            else:
                chunks.append(_Chunk(row, n, start, torch.tensor(table, dtype=torch.long, device=device)))
            row += n
            feed_rows[i] = range(row - feed.num_logits, row)
        rows = [r for span in feed_rows for r in span]  # logits back in the callers' feed order
        packed = [feeds[i] for i in order]
        to = dict(device=device, dtype=torch.long)
        input_ids = torch.tensor(ids, **to)[None]
        positions = torch.tensor(q_pos, **to)
        width = max((len(x) for x in decode_tables), default=0)
        padded = torch.tensor([x + [0] * (width - len(x)) for x in decode_tables], dtype=torch.long)
        padded = padded.view(len(decode_tables), width)
        lens = torch.tensor(decode_lens, dtype=torch.long)
        valid = torch.arange(width * bs)[None] < lens[:, None]
        n_max = max((len(r) for r in short_rows), default=1)
        real = None
        if n_max == 1:
            decode_rows, query_pos = slice(0, len(short_rows)), lens - 1
        else:  # [B, n_max]: each feed's rows, padded by repeating its last (masked out of the write-back)
            decode_rows = torch.tensor([list(r) + [r[-1]] * (n_max - len(r)) for r in short_rows], dtype=torch.long)
            counts = torch.tensor([len(r) for r in short_rows])
            real = torch.arange(n_max)[None] < counts[:, None]
            query_pos = torch.minimum((lens - counts)[:, None] + torch.arange(n_max)[None], (lens - 1)[:, None])
            decode_rows, real = decode_rows.to(device), real.to(device)
        step = PagedStep(positions[None], self.k_pool, self.v_pool, torch.tensor(new_slots, **to),
                         decode_rows, padded.to(device), valid.to(device), query_pos.to(device), chunks, real)
        hooks = self._steering_hooks(packed, len(ids))
        return model(**self._inputs(input_ids, packed), cache=step, logits_to_keep=torch.tensor(rows, **to),
                     hooks=hooks)[0].float()

    def _inputs(self, input_ids: Tensor, feeds: list[Feed]) -> dict[str, Tensor]:
        """``input_ids`` [1, T], or, when a feed carries image rows, ``inputs_embeds`` [1, T, hidden]: the tokens'
        embeddings (``Transformer.token_embeddings``) with those rows replaced by
        the image features, as ``LlavaForConditionalGeneration.embed`` splices them."""
        if all(f.image_rows is None for f in feeds):
            return {"input_ids": input_ids}
        x = self.model.token_embeddings(input_ids)
        row = 0
        for f in feeds:
            if f.image_rows is not None:
                offsets, embeds = f.image_rows
                x[0, row + offsets.to(x.device)] = embeds.to(device=x.device, dtype=x.dtype)
            row += len(f.tokens)
        return {"inputs_embeds": x}

    def _steering_hooks(self, feeds: list[Feed], num_rows: int) -> dict[str, Hook] | None:
        """Hooks adding each steered feed's vector to its own rows of the packed step; None if none steers."""
        steered = [(i, f.steering) for i, f in enumerate(feeds) if f.steering is not None and not f.steering.is_noop]
        if not steered:
            return None
        model = self.model
        starts, row = [], 0
        for f in feeds:
            starts.append(row)
            row += len(f.tokens)
        additions: dict[int, Tensor] = {}
        for i, steering in steered:
            lo, hi = starts[i], starts[i] + len(feeds[i].tokens)
            for layer, delta in steering.deltas(model.device, model.dtype).items():
                if layer not in additions:
                    additions[layer] = torch.zeros(1, num_rows, delta.shape[0], device=model.device, dtype=model.dtype)
                additions[layer][0, lo:hi] = delta
        return {HOOK_POINT.format(layer): (lambda x, name, add=add: x + add) for layer, add in additions.items()}


# ---- quantized KV pool ----------------------------------------------------------------------------------
class _QChunk(_Chunk):
    """A prefill chunk over a quantized pool. Its context is the first ``start`` tokens read from the pool
    (blocks ``blocks``, of which those at flat positions ``fix_at`` are staged in float at ``fix_slot``)
    followed by the chunk's own new keys/values, in full precision. Blocks [q_lo, q_hi) of the sequence
    are quantized from that float context at the end of the layer."""

    def __init__(self, row: int, n: int, start: int, blocks: Tensor, fix_at: Tensor, fix_slot: Tensor,
                 q_lo: int, q_hi: int) -> None:
        super().__init__(row, n, start, blocks)
        self.fix_at, self.fix_slot, self.q_lo, self.q_hi = fix_at, fix_slot, q_lo, q_hi


class QuantizedStep(PagedStep):
    """The ``AttentionStep`` over a ``QuantizedModelRunner``'s pools, for one engine step. Per layer:
      1. chunks read their earlier context (dequantized blocks + staged float blocks) *before* any staging
         write, because a chunk that fills its partly filled first block hands that block's staging slot on
         to another block in this same step (the plan in ``QuantizedModelRunner.run``);
      2. the new keys/values of tokens landing in staged blocks are written to their staging slots;
      3. decode rows gather their blocks, dequantize them and overwrite the staged ones with the float copy
         (their own new token is staged, so it attends in full precision);
      4. each chunk attends over [earlier context, its own float keys/values];
      5. blocks that left the full-precision window this step are quantized (from their staging slot, or
         from a chunk's float context) and written to the block pool.
    """

    def __init__(self, runner: "QuantizedModelRunner", positions: Tensor, stage_rows: Tensor, stage_idx: Tensor,
                 decode_rows: Tensor, decode_blocks: Tensor, decode_valid: Tensor, decode_pos: Tensor,
                 decode_fix_at: Tensor, decode_fix_slot: Tensor, chunks: list[_QChunk],
                 slot_quant_blocks: Tensor, slot_quant_slots: Tensor, chunk_quant_blocks: Tensor) -> None:
        super().__init__(positions, [], [], stage_idx, decode_rows, decode_blocks, decode_valid, decode_pos, chunks)
        self.runner, self.stage_rows, self.stage_idx = runner, stage_rows, stage_idx
        self.decode_fix_at, self.decode_fix_slot = decode_fix_at, decode_fix_slot
        self.slot_quant_blocks, self.slot_quant_slots = slot_quant_blocks, slot_quant_slots
        self.chunk_quant_blocks = chunk_quant_blocks  # the chunks' [q_lo, q_hi) block ids, chunk by chunk

    def attend(self, attn, q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        r = self.runner
        res_k, res_v = r.res_k[layer], r.res_v[layer]  # [slots, block_size, K, D]
        kt, vt = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [N, K, D]
        prev = [r.gather(layer, c.blocks, c.fix_at, c.fix_slot) if c.start else None for c in self.chunks]
        if self.stage_rows.numel():
            res_k.flatten(0, 1).index_copy_(0, self.stage_idx, kt.index_select(0, self.stage_rows))
            res_v.flatten(0, 1).index_copy_(0, self.stage_idx, vt.index_select(0, self.stage_rows))
        y = torch.empty_like(q)
        if self.decode_rows.numel():
            b, s_max = self.decode_valid.shape
            qd = q[0][:, self.decode_rows].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
            kd, vd = r.gather(layer, self.decode_blocks.flatten(), self.decode_fix_at, self.decode_fix_slot)
            kd = kd.view(b, s_max, *kd.shape[2:]).transpose(1, 2)  # [B, K, S_max, D]
            vd = vd.view(b, s_max, *vd.shape[2:]).transpose(1, 2)
            yd = attn.attention(qd, kd, vd, self._decode_mask(attn.window))
            y[0][:, self.decode_rows] = yd.squeeze(2).transpose(0, 1)
        bs = r.block_size
        sources_k, sources_v = [], []
        if self.slot_quant_slots.numel():
            sources_k.append(res_k.index_select(0, self.slot_quant_slots))
            sources_v.append(res_v.index_select(0, self.slot_quant_slots))
        for c, p in zip(self.chunks, prev):
            kc, vc = kt[c.row:c.row + c.n], vt[c.row:c.row + c.n]
            if p is not None:
                kc = torch.cat((p[0].flatten(0, 1)[:c.start], kc))  # [total, K, D]
                vc = torch.cat((p[1].flatten(0, 1)[:c.start], vc))
            mask = c.mask_for(attn.window)
            y[:, :, c.row:c.row + c.n] = attn.attention(q[:, :, c.row:c.row + c.n], kc.transpose(0, 1)[None],
                                                        vc.transpose(0, 1)[None], mask, causal=mask is None)
            if c.q_hi > c.q_lo:
                sources_k.append(kc[c.q_lo * bs:c.q_hi * bs].unflatten(0, (-1, bs)))
                sources_v.append(vc[c.q_lo * bs:c.q_hi * bs].unflatten(0, (-1, bs)))
        if sources_k:
            blocks = torch.cat((self.slot_quant_blocks, self.chunk_quant_blocks))
            r.store(layer, blocks, torch.cat(sources_k), torch.cat(sources_v))
        return y


class QuantizedModelRunner(ModelRunner):
    """The paged runner with quantized KV blocks (``kv_quant.KVQuantFormat``: KIVI 2/4-bit or int8).

    Per layer, ``payload[layer]`` holds the format's tensors ([num_blocks, ...]: packed codes, scales, zero
    points). A block is quantized once it is full *and* behind the full-precision window: the last
    ``residual_blocks`` full blocks of a sequence plus its partly filled one (KIVI's residual_length, here
    a whole number of blocks, since the key statistics are per channel over one block's tokens). Until then
    it lives in a float *staging* slot (``res_k``/``res_v`` [slots, block_size, K, D]); ``slot_of`` maps
    block -> slot. With ``residual_blocks`` 0 at most one block per sequence is staged (its partly filled
    one), so ``max_num_seqs`` slots suffice; the pool grows by a slot if ever exhausted (counted in
    ``staging_grown``) rather than fail a step.

    Full blocks are quantized before anyone else can share them (prefix cache, forks) when
    ``residual_blocks`` is 0; with a window, a shared block is read through ``slot_of`` wherever it is, and a
    cached block freed while staged is quantized at the start of the next step (``on_block_freed``).
    """

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, fmt: KVQuantFormat,
                 staging_slots: int, residual_blocks: int = 0) -> None:
        self.model, self.block_size, self.num_blocks = model, block_size, num_blocks
        self.fmt, self.residual_blocks = fmt, residual_blocks
        cfg, device, dtype = model.config, model.device, model.dtype
        fmt.check(cfg.head_dim)
        self.k_pool = self.v_pool = []  # no float pool: the base class's copy_block/kv_cache_bytes are overridden
        self.payload: list[dict[str, Tensor]] = []
        for i in range(cfg.num_layers):
            shapes = fmt.payload_shapes(block_size, cfg.kv_heads(i), cfg.head_dim)
            self.payload.append({name: torch.zeros((num_blocks, *shape), device=device, dtype=dt)
                                 for name, (shape, dt) in shapes.items()})
        self.res_k = [torch.zeros(staging_slots, block_size, cfg.kv_heads(i), cfg.head_dim, device=device, dtype=dtype)
                      for i in range(cfg.num_layers)]
        self.res_v = [torch.zeros_like(x) for x in self.res_k]
        self.slot_of: dict[int, int] = {}
        self._free_slots = list(range(staging_slots))
        self._pending: dict[int, int] = {}  # cached blocks freed while staged: quantized next step
        self.staging_grown = 0

    @staticmethod
    def quantized_bytes_per_block(model: Transformer, block_size: int, fmt: KVQuantFormat) -> int:
        cfg = model.config
        return sum(fmt.bytes_per_block(block_size, cfg.kv_heads(i), cfg.head_dim) for i in range(cfg.num_layers))

    def kv_cache_bytes(self) -> int:
        """Bytes held: the quantized block pool plus the float staging slots."""
        return sum(t.nbytes for p in self.payload for t in p.values()) + \
            sum(t.nbytes for t in (*self.res_k, *self.res_v))

    # ---- staging slots ------------------------------------------------------------------------------
    def _alloc(self, block: int) -> int:
        if not self._free_slots:
            self.staging_grown += 1
            self.res_k = [torch.cat((x, x.new_zeros(1, *x.shape[1:]))) for x in self.res_k]
            self.res_v = [torch.cat((x, x.new_zeros(1, *x.shape[1:]))) for x in self.res_v]
            self._free_slots.append(self.res_k[0].shape[0] - 1)
        slot = self._free_slots.pop()
        self.slot_of[block] = slot
        return slot

    def _release(self, block: int) -> None:
        self._free_slots.append(self.slot_of.pop(block))

    def on_block_freed(self, block: int, cached: bool) -> None:
        """The block manager dropped ``block``'s last reference. A staged block's slot is freed, unless the
        block stays in the prefix cache (``cached``: full, hashed), whose KV must survive: it is quantized
        first, at the start of the next step, in one batch."""
        if block not in self.slot_of:
            return
        if cached:
            self._pending[block] = self.slot_of[block]
        else:
            self._release(block)

    @torch.inference_mode()
    def _flush_pending(self) -> None:
        if not self._pending:
            return
        device = self.model.device
        blocks = torch.tensor(list(self._pending), dtype=torch.long, device=device)
        slots = torch.tensor(list(self._pending.values()), dtype=torch.long, device=device)
        for layer in range(len(self.payload)):
            self.store(layer, blocks, self.res_k[layer].index_select(0, slots), self.res_v[layer].index_select(0, slots))
        for b in self._pending:
            self._release(b)
        self._pending.clear()

    # ---- per-layer tensor work ----------------------------------------------------------------------
    def gather(self, layer: int, blocks: Tensor, fix_at: Tensor, fix_slot: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [len(blocks), block_size, K, D] of ``blocks``: dequantized, then the staged ones
        (positions ``fix_at`` in ``blocks``) replaced by their float staging slots ``fix_slot``."""
        p = {name: t.index_select(0, blocks) for name, t in self.payload[layer].items()}
        k, v = self.fmt.dequantize(p, self.model.dtype)
        if fix_at.numel():
            k.index_copy_(0, fix_at, self.res_k[layer].index_select(0, fix_slot))
            v.index_copy_(0, fix_at, self.res_v[layer].index_select(0, fix_slot))
        return k, v

    def store(self, layer: int, blocks: Tensor, k: Tensor, v: Tensor) -> None:
        """Quantize whole blocks k, v [m, block_size, K, D] into pool blocks ``blocks`` [m]."""
        for name, t in self.fmt.quantize(k, v).items():
            self.payload[layer][name].index_copy_(0, blocks, t)

    @torch.inference_mode()
    def copy_block(self, src: int, dst: int) -> None:
        """A fork's copy of a partly filled block: its staging slot (float) or, were it quantized, its codes."""
        if dst in self.slot_of:
            self._release(dst)
        if src in self.slot_of:
            s, d = self.slot_of[src], self._alloc(dst)
            for pool in (*self.res_k, *self.res_v):
                pool[d].copy_(pool[s])
        for p in self.payload:  # cheap, and keeps dst whole if src was quantized
            for t in p.values():
                t[dst].copy_(t[src])

    # ---- one step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, feeds: list[Feed]) -> Tensor:
        """As ``ModelRunner.run``, over the quantized pool; plans which tokens are staged and which blocks
        are quantized this step (see ``QuantizedStep``)."""
        self._flush_pending()
        model, bs, rb = self.model, self.block_size, self.residual_blocks
        device = model.device
        ids, q_pos, rows = [], [], []
        stage_rows, stage_idx = [], []
        decode_rows, decode_tables, decode_lens, decode_fix = [], [], [], []
        chunks: list[_QChunk] = []
        chunk_quant: list[int] = []
        slot_quant: dict[int, int] = {}  # block -> slot: quantized from staging after this step's writes
        row = 0
        for feed in feeds:
            start, n = feed.start, len(feed.tokens)
            total = start + n
            table = feed.block_table
            first, last = start // bs, (total - 1) // bs
            keep_from = max(total // bs - rb, 0)  # blocks before it are quantized by the end of this step
            ids.extend(feed.tokens)
            q_pos.append(torch.arange(start, total))
            # Staged blocks this feed reads. Without a window only its partly filled block can be staged; with
            # one, shared blocks may be staged anywhere (another sequence's window), so look at all of them.
            staged = [(j, self.slot_of[table[j]]) for j in range(0 if rb else first, last + 1)
                      if table[j] in self.slot_of]
            for j, s in staged:  # left the window without being touched now: quantize from staging
                if j < min(first, keep_from):
                    slot_quant[table[j]] = s
            if n == 1:
                b = table[first]
                s = self.slot_of.get(b)
                if s is None:
                    if start % bs:
                        raise RuntimeError(f"block {b} is partly filled but not staged (quantized KV state lost)")
                    s = self._alloc(b)
                    staged.append((first, s))
                stage_rows.append(row)
                stage_idx.append(s * bs + start % bs)
                if first < keep_from:  # this token fills it and it leaves the window at once
                    slot_quant[b] = s
                decode_rows.append(row)
                decode_tables.append(table[:last + 1])
                decode_lens.append(total)
                decode_fix.append(staged)
            else:
                n_prev = -(-start // bs)
                fix = [(j, s) for j, s in staged if j < n_prev]
                q_lo, q_hi = first, max(first, keep_from)
                for j in range(q_lo, q_hi):  # quantized from the chunk's float context, not from staging
                    if table[j] in self.slot_of:
                        if start % bs == 0 or j != first:
                            raise RuntimeError(f"block {table[j]} is staged but this chunk starts it afresh")
                        # The chunk reads this partly filled block's prefix before any staging write in each
                        # layer, so its slot can take another block's tokens in this same step.
                        self._release(table[j])
                    chunk_quant.append(table[j])
                for j in range(max(first, keep_from), last + 1):
                    b = table[j]
                    s = self.slot_of.get(b)
                    if s is None:
                        if j * bs < start:
                            raise RuntimeError(f"block {b} is partly filled but not staged (quantized KV state lost)")
                        s = self._alloc(b)
                    for pos in range(max(start, j * bs), min(total, (j + 1) * bs)):
                        stage_rows.append(row + pos - start)
                        stage_idx.append(s * bs + pos % bs)
                to_dev = dict(dtype=torch.long, device=device)
                chunks.append(_QChunk(row, n, start, torch.tensor(table[:n_prev], **to_dev),
                                      torch.tensor([j for j, _ in fix], **to_dev),
                                      torch.tensor([s for _, s in fix], **to_dev), q_lo, q_hi))
            row += n
            rows.extend(range(row - feed.num_logits, row))
        to = dict(device=device, dtype=torch.long)
        width = max((len(x) for x in decode_tables), default=0)
        padded = torch.zeros(len(decode_tables), width, dtype=torch.long)
        fix_at, fix_slot = [], []
        for i, (tab, fix) in enumerate(zip(decode_tables, decode_fix)):
            padded[i, :len(tab)] = torch.tensor(tab, dtype=torch.long)
            fix_at += [i * width + j for j, _ in fix]
            fix_slot += [s for _, s in fix]
        lens = torch.tensor(decode_lens, dtype=torch.long)
        valid = torch.arange(width * bs)[None] < lens[:, None]
        step = QuantizedStep(
            self, torch.cat(q_pos).to(device)[None], torch.tensor(stage_rows, **to), torch.tensor(stage_idx, **to),
            torch.tensor(decode_rows, **to), padded.to(device), valid.to(device), (lens - 1).to(device),
            torch.tensor(fix_at, **to), torch.tensor(fix_slot, **to), chunks,
            torch.tensor(list(slot_quant), **to), torch.tensor(list(slot_quant.values()), **to),
            torch.tensor(chunk_quant, **to))
        hooks = self._steering_hooks(feeds, len(ids))
        out = model(**self._inputs(torch.tensor(ids, **to)[None], feeds), cache=step,
                    logits_to_keep=torch.tensor(rows, **to), hooks=hooks)
        for b in slot_quant:  # read by every layer of this step; free now that each has quantized it
            self._release(b)
        return out[0].float()
