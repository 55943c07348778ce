"""ModelRunner: turns a scheduled batch into tensors, runs the target once, returns next-token logits.

Owns all per-model torch state:
- the KV cache: per layer K and V buffers [R, H_kv, C, D] (R = max running requests, C = columns, grown
  by doubling). A running request owns one row; rows 0..B-1 are always the running requests (a finished
  request's row is refilled with the last row: "swap-remove"), so a decode step reads plain views
  `K[:B, :, :Lmax]` with no gather. Prefill is packed ([1, sum of prompt lengths], no padding), so a
  row's valid columns are [0, kv_len) (kv_start stays 0; it exists for left-padded layouts).
- the steering vector table V [L_sel, R + 1, d], row 0 all zeros (see injection.py), and its slots.

Attention goes through transformers' AttentionInterface ("atv_engine"), switched on only for the
runner's own forwards; the function writes the new K/V into the cache and attends over it. Per-step
state lives in a `StepContext`, set for one forward by a context manager. Knows nothing of HTTP,
queues or sampling.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.nn import functional as F
from transformers import AttentionInterface

from atv_core.steering.injection import steering
from atv_core.steering.layers import find_decoder_layers
from atv_core.engine.request import Request

ATTN_NAME = "atv_engine"
_STEP: contextvars.ContextVar["StepContext | None"] = contextvars.ContextVar("atv_step", default=None)


@dataclass
class KVCache:
    rows: int
    columns: int
    k: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [R, H_kv, C, D]
    v: dict[int, torch.Tensor] = field(default_factory=dict)

    def buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:  # allocated lazily: head count and head dim come from the model itself
            shape = (self.rows, like.shape[1], self.columns, like.shape[3])
            self.k[layer] = like.new_zeros(shape)
            self.v[layer] = like.new_zeros(shape)
        return self.k[layer], self.v[layer]

    def ensure_columns(self, needed: int) -> None:
        if needed <= self.columns:
            return
        new = self.columns
        while new < needed:
            new *= 2
        for store in (self.k, self.v):
            for layer, buf in store.items():
                grown = buf.new_zeros(buf.shape[0], buf.shape[1], new, buf.shape[3])
                grown[:, :, : self.columns] = buf
                store[layer] = grown
        self.columns = new

    def move_row(self, src: int, dst: int, columns: int) -> None:
        for store in (self.k, self.v):
            for buf in store.values():
                buf[dst, :, :columns] = buf[src, :, :columns]


@dataclass
class StepContext:
    phase: str                       # "prefill" | "decode"
    cache: KVCache
    mask: torch.Tensor               # bool, [B, 1, T, Lk]: True = may attend
    write_cols: object               # decode: [B] column each row writes; prefill: ([N] rows, [N] columns)
    key_cols: int                    # Lk
    query_pos: torch.Tensor          # [B, T] column index of each query (for sliding windows)
    sliding: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask_for(self, window: int | None) -> torch.Tensor:
        if not window:
            return self.mask
        if window not in self.sliding:  # keys strictly within `window` columns of the query
            key_col = torch.arange(self.key_cols, device=self.mask.device)
            near = (self.query_pos.unsqueeze(-1) - key_col) < window               # [B, T, Lk]
            self.sliding[window] = self.mask & near.unsqueeze(1)
        return self.sliding[window]


def engine_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, T, D], key/value [B, H_kv, T, D] -> ([B, T, H, D], None). Writes K/V into the cache."""
    ctx = _STEP.get()
    if ctx is None:
        raise RuntimeError("atv_engine attention used outside a ModelRunner step")
    if kwargs.get("softcap"):
        raise ValueError("attention logit soft-capping is not supported by the ATV engine")
    kbuf, vbuf = ctx.cache.buffers(module.layer_idx, key)
    b = query.shape[0]
    mask = ctx.mask_for(getattr(module, "sliding_window", None))
    write = ctx.write_cols
    if mask.device != query.device:  # layers spread over devices with device_map: bring step tensors along
        mask = mask.to(query.device)
        write = tuple(t.to(query.device) for t in write) if isinstance(write, tuple) else write.to(query.device)
    if ctx.phase == "prefill":  # packed [1, N]: token i goes to (row[i], column[i])
        row_index, col_index = write
        kbuf[row_index, :, col_index] = key[0].transpose(0, 1)
        vbuf[row_index, :, col_index] = value[0].transpose(0, 1)
        keys, values = key, value
    else:  # decode [B, 1]: running requests own cache rows 0..B-1
        index = torch.arange(b, device=key.device)
        kbuf[index, :, write] = key[:, :, 0]
        vbuf[index, :, write] = value[:, :, 0]
        keys, values = kbuf[:b, :, : ctx.key_cols], vbuf[:b, :, : ctx.key_cols]
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                         enable_gqa=query.shape[1] != keys.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, engine_attention)


@contextmanager
def _engine_step(model: torch.nn.Module, ctx: StepContext):
    token = _STEP.set(ctx)
    previous = model.config._attn_implementation
    model.config._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        model.config._attn_implementation = previous
        _STEP.reset(token)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, max_rows: int, steer_layers: Sequence[int] | None = None,
                 position: str = "all", initial_columns: int = 256, layers_path: str | None = None):
        self.model = model
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        n_layers = len(find_decoder_layers(model, layers_path))
        self.layers_path = layers_path
        self.steer_layers = tuple(range(n_layers)) if steer_layers is None else tuple(steer_layers)
        self.position = position
        self.cache = KVCache(rows=max_rows, columns=initial_columns)
        self.rows: list[Request] = []                                           # row i -> request
        hidden = model.config.hidden_size
        self.table = torch.zeros(len(self.steer_layers), max_rows + 1, hidden, device=self.device, dtype=self.dtype)
        self.free_slots = list(range(max_rows, 0, -1))

    # ---- vector slots -------------------------------------------------------------------------
    @torch.no_grad()
    def assign_vector(self, request: Request, vector: torch.Tensor) -> None:
        """vector [L_sel, d] (already scaled) -> a table slot owned by the request until release()."""
        if not self.free_slots:
            raise RuntimeError("no free vector slot (more running requests than max_rows)")
        slot = self.free_slots.pop()
        self.table[:, slot] = vector.to(self.device, self.dtype)
        request.vector_slot = slot

    @property
    def slots_used(self) -> int:
        return self.table.shape[1] - 1 - len(self.free_slots)

    # ---- steps ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, requests: Sequence[Request]) -> torch.Tensor:
        """Packed prefill of newly admitted requests: one [1, N] sequence (N = sum of prompt lengths, no
        padding) with a block-diagonal causal mask -> last-token logits [k, V] (fp32)."""
        if len(self.rows) + len(requests) > self.cache.rows:
            raise RuntimeError("prefill would exceed the KV cache rows")
        lengths = [r.num_prompt_tokens for r in requests]
        self.cache.ensure_columns(max(lengths) + 1)
        row0 = len(self.rows)
        ids = torch.tensor([t for r in requests for t in r.prompt_ids]).view(1, -1)
        positions = torch.cat([torch.arange(n) for n in lengths]).view(1, -1)              # [1, N]
        seq = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(lengths))   # [N] owner of token
        rows = seq + row0
        for b, request in enumerate(requests):
            request.kv_row, request.kv_start, request.kv_len = row0 + b, 0, lengths[b]
            self.rows.append(request)
        causal = positions[0].unsqueeze(1) >= positions[0].unsqueeze(0)
        mask = (seq.unsqueeze(1) == seq.unsqueeze(0)) & causal                              # [N, N]
        last = torch.cumsum(torch.tensor(lengths), 0) - 1                                    # [k] last tokens
        slot = torch.tensor([r.vector_slot for r in requests])[seq]
        if self.position == "last":
            slot = torch.where(torch.isin(torch.arange(len(seq)), last), slot, 0)
        n = len(seq)
        ctx = StepContext("prefill", self.cache, mask.view(1, 1, n, n).to(self.device),
                          (rows.to(self.device), positions[0].to(self.device)), n,
                          torch.arange(n).view(1, n).to(self.device))
        return self._forward(ids, positions, ctx, slot.view(1, -1), logits_to_keep=last.to(self.device))

    @torch.no_grad()
    def decode(self, last_tokens: Sequence[int]) -> torch.Tensor:
        """One token for every running request, in row order -> logits [B, V] (fp32)."""
        b = len(self.rows)
        write = torch.tensor([r.kv_len for r in self.rows])
        start = torch.tensor([r.kv_start for r in self.rows])
        key_cols = int(write.max()) + 1
        self.cache.ensure_columns(key_cols)
        col = torch.arange(key_cols)
        mask = (col.unsqueeze(0) >= start.unsqueeze(1)) & (col.unsqueeze(0) <= write.unsqueeze(1))  # [B, Lk]
        ids = torch.tensor(last_tokens, dtype=torch.long).view(b, 1)
        positions = torch.tensor([r.kv_len - r.kv_start for r in self.rows]).view(b, 1)
        slots = torch.tensor([r.vector_slot for r in self.rows]).view(b, 1)
        ctx = StepContext("decode", self.cache, mask.view(b, 1, 1, key_cols).to(self.device),
                          write.to(self.device), key_cols, write.view(b, 1).to(self.device))
        logits = self._forward(ids, positions, ctx, slots)
        for request in self.rows:
            request.kv_len += 1
        return logits

    def _forward(self, ids, positions, ctx: StepContext, slots: torch.Tensor, logits_to_keep=1) -> torch.Tensor:
        steer = bool(slots.any())
        table = self.table if steer else None
        with _engine_step(self.model, ctx), steering(self.model, table, slots.to(self.device), self.steer_layers,
                                                      self.layers_path):
            out = self.model(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                             attention_mask=ctx.mask, use_cache=False, logits_to_keep=logits_to_keep)
        if isinstance(logits_to_keep, torch.Tensor):
            return out.logits[0].float()                                    # packed: [k, V]
        return out.logits[:, -1].float()

    @torch.no_grad()
    def release(self, request: Request) -> None:
        """Free the request's cache row (swap-remove: the last row moves into it) and its vector slot."""
        if request.kv_row >= 0:
            row, last = request.kv_row, len(self.rows) - 1
            moved = self.rows[last]
            if row != last:
                self.cache.move_row(last, row, moved.kv_len)
                moved.kv_row = row
                self.rows[row] = moved
            self.rows.pop()
            request.kv_row = -1
        if request.vector_slot:
            self.table[:, request.vector_slot] = 0
            self.free_slots.append(request.vector_slot)
            request.vector_slot = 0
