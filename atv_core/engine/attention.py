"""Attention over each request's own tokens, for one packed engine step (prompt chunks and decodes together).

The target runs once per step on a packed sequence [1, N] (N = tokens computed this step, all requests
end to end). For every attention layer transformers calls `paged_attention` (registered in its
AttentionInterface as "atv_paged") with that layer's query [1, H, N, D] and new key/value [1, H_kv, N, D]:

  1. write:  K_pool[slot_mapping[t]] = k[t], V_pool[slot_mapping[t]] = v[t]      (kv_cache.py)
  2. attend: per *bucket* of chunks, one gather of their queries [B_b, H, Q_b, D] and of their requests'
             keys and values 0..k_len-1 from the pools [B_b, H_kv, K_b, D], then SDPA with the mask
             key_pos <= query_pos (and query_pos - key_pos < window on sliding-window layers);
  3. scatter the outputs back to [1, N, H, D].

Chunks are bucketed by their query length (decodes apart; 8 wide up to 64 queries, then by powers of two)
and of their key length (prompt chunks: up to 256 keys together, padding that little costs less than another
kernel call; decodes, whose gather and products scale with the padded keys: 64 wide up to 512, then 8 classes
per power of two), and padded only to the longest member, so a decode over 40 keys is never padded to a 7k-token request,
and a long prompt's chunk is its own bucket. A bucket that is one fresh prompt runs SDPA's causal kernel without
a mask; one that is decodes of equal length runs without a mask. Padding never reads unwritten memory:
padded keys repeat their request's first slot and padded queries repeat the chunk's last query; both are
masked or dropped.

Decodes in fp32 or bf16 on CPU skip the gather where the C++ kernel (cpu_kernel.py, csrc/paged_decode.cpp) is built:
it reads each request's keys and values in place through the same slots (Bucket.attend_kernel). A lone prompt
chunk after earlier ones (fp32, CPU) runs without a mask: prefix and causal self-attention merged by their
log-sum-exps (Bucket.attend_continued).

Everything that depends on the step (slots, bucket indices) is built once on the host by `plan_step`
before the forward; the per-layer work is tensor code only. This module knows nothing of requests,
scheduling or steering.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.nn import functional as F
from transformers import AttentionInterface

from atv_core.engine import cpu_kernel
from atv_core.engine.kv_cache import KVLayout, LayerKV, PagedKVCache

PAGED = "atv_paged"
# torch's CPU flash attention, which also returns the log-sum-exp (Bucket.attend_continued); None if absent
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
PROBE = "atv_probe"
_PLAN: contextvars.ContextVar["StepPlan | None"] = contextvars.ContextVar("atv_step_plan", default=None)
_PROBED: contextvars.ContextVar["dict | None"] = contextvars.ContextVar("atv_probe", default=None)


@dataclass(frozen=True)
class Segment:
    """One request's queries this step: positions [start, start + length) of its sequence."""
    start: int                        # tokens already in the cache before this step
    length: int
    block_table: Sequence[int]

    @property
    def keys(self) -> int:
        return self.start + self.length


@dataclass
class Bucket:
    q_index: torch.Tensor             # [B_b, Q_b] index of each query in the step's N tokens
    q_pos: torch.Tensor               # [B_b, Q_b] its position in its own sequence
    kv_slot: torch.Tensor             # [B_b, K_b] pool slot of each key position
    out_rows: torch.Tensor            # [n] rows of the flattened [B_b * Q_b] output that are real queries
    out_index: torch.Tensor           # [n] their index in the step's N tokens
    causal: bool                      # fresh prompts only, no padding: SDPA's causal kernel, no mask
    unmasked: bool                    # single queries that see every key: no mask
    continued: bool = False           # one prompt chunk after earlier ones (start > 0), several queries: split
    masks: dict = field(default_factory=dict)   # window (0: none) -> bool [B_b, 1, Q_b, K_b]; (-1-window, dtype) -> additive;
                                                # ("rows", H_kv) -> head_rows(); "kernel" -> attend_kernel's rows, lengths

    def effective_window(self, window: int) -> int:
        """The layer's sliding window, or 0 where it is none or wider than every key (it changes nothing)."""
        return window if window and window < self.kv_slot.shape[1] else 0

    def mask(self, window: int) -> torch.Tensor | None:
        keys = self.kv_slot.shape[1]
        window = self.effective_window(window)
        if not window and (self.causal or self.unmasked):
            return None
        if window not in self.masks:
            key_pos = torch.arange(keys, device=self.q_pos.device)
            distance = self.q_pos.unsqueeze(-1) - key_pos                               # [B_b, Q_b, K_b]
            allowed = distance >= 0
            if window:
                allowed &= distance < window
            self.masks[window] = allowed.unsqueeze(1)
        return self.masks[window]

    def attend(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, window: int,
               scaling: float | None, kernel=None) -> torch.Tensor:
        """q [N, H, D], pools [S, H_kv, D] -> outputs of this bucket's real queries [n, H, D]. `kernel`: the
        compiled CPU decode kernel (cpu_kernel.py) or None."""
        if self.q_index.shape[1] == 1 and q.device.type == "cpu":
            if kernel is not None and q.dtype in cpu_kernel.DTYPES and k_pool.dtype == q.dtype:
                return self.attend_kernel(kernel, q, k_pool, v_pool, window, scaling)
            if q.dtype == torch.float32:
                return self.attend_decodes(q, k_pool, v_pool, window, scaling)
        query = _gather(q, self.q_index).transpose(1, 2)                                # [B_b, H, Q_b, D]
        key = _gather(k_pool, self.kv_slot).transpose(1, 2)                             # [B_b, H_kv, K_b, D]
        value = _gather(v_pool, self.kv_slot).transpose(1, 2)
        if (self.continued and q.device.type == "cpu" and q.dtype == torch.float32 and _CPU_FLASH is not None
                and not self.effective_window(window)):
            out = self.attend_continued(query, key, value, scaling)
        else:
            mask = self.mask(window)
            causal = mask is None and self.causal and query.shape[2] > 1
            if query.shape[1] != key.shape[1] and query.device.type != "cpu" and mask is not None:
                out = masked_gqa(query, key, value, mask, scaling)
            else:
                out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                                     scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).reshape(-1, *q.shape[1:]).index_select(0, self.out_rows)

    def attend_continued(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scaling: float | None) -> torch.Tensor:
        """One prompt chunk continuing its request (positions start .. start + L - 1, keys 0 .. start + L - 1) on
        CPU, without a mask: its queries see every key before the chunk (one unmasked attention) and the chunk's
        own keys causally (one is_causal attention), and the two are merged by their log-sum-exps:
            out = o_prefix * exp(lse_prefix - lse) + o_chunk * exp(lse_chunk - lse),  lse = logaddexp(both).
        The masked call it replaces turned the [L, K] boolean mask into float scores' worth of buffers: for a
        512-token chunk at 7,000 keys ~30-40 MiB of transient memory vs ~4 MiB here (the long prompt's last
        chunks set the mixed scenario's peak RSS). Needs torch's CPU flash-attention op (returns the lse). fp32
        only: in bf16 each half's output is rounded before the merge (up to ~5 bf16 steps off the masked call on
        the tiny models, against ~1.5), so bf16 keeps the masked call."""
        start = int(self.q_pos[0, 0])                  # query [1, H, L, D], key / value [1, H_kv, K, D] -> [1, H, L, D]
        o_prefix, lse_prefix = _CPU_FLASH(query, key[:, :, :start], value[:, :, :start], 0.0, False, scale=scaling)
        o_chunk, lse_chunk = _CPU_FLASH(query, key[:, :, start:], value[:, :, start:], 0.0, True, scale=scaling)
        lse = torch.logaddexp(lse_prefix, lse_chunk)
        return o_prefix * (lse_prefix - lse).exp_().unsqueeze(-1) + o_chunk * (lse_chunk - lse).exp_().unsqueeze(-1)

    def attend_decodes(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, window: int,
                       scaling: float | None) -> torch.Tensor:
        """One query per request, fp32 on CPU: the keys and values are gathered head-major, one row of D per
        (request, K/V head, key) -> [B_b * H_kv, K_b, D] contiguous, so that each of the two products is one
        batched matmul of contiguous matrices. Same arithmetic as SDPA's math: softmax(q k^T * scale + mask) v.
        On the 2-core CPU VM (B_b 32, 160 keys, 3 K/V heads of 64, GQA 3) this took 0.67 ms per layer, against
        1.11 ms for per-head matmuls on the [B_b, K_b, H_kv, D] gather and about 0.6-0.8 ms for SDPA's CPU
        kernel after that gather. (bf16 without the C++ kernel stays on SDPA, whose kernel keeps scores and sums
        in fp32.)"""
        batch, heads_kv, head_dim = self.kv_slot.shape[0], k_pool.shape[1], k_pool.shape[2]
        rows = self.head_rows(heads_kv)                                                # [B_b * H_kv * K_b]
        keys = k_pool.view(-1, head_dim).index_select(0, rows).view(batch * heads_kv, -1, head_dim)
        values = v_pool.view(-1, head_dim).index_select(0, rows).view(batch * heads_kv, -1, head_dim)
        query = q.index_select(0, self.q_index[:, 0]).view(batch * heads_kv, -1, head_dim)  # [B_b * H_kv, G, D]
        scale = head_dim ** -0.5 if scaling is None else scaling
        scores = torch.bmm(query, keys.transpose(1, 2)).mul_(scale)                     # [B_b * H_kv, G, K_b]
        bias = self.additive_mask(window, q.dtype)                                     # [B_b, 1, K_b] or None
        if bias is not None:
            scores.view(batch, heads_kv, -1, scores.shape[-1]).add_(bias.unsqueeze(1))
        return torch.bmm(scores.softmax(-1), values).view(batch, -1, head_dim)          # [B_b, H, D]

    def attend_kernel(self, kernel, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, window: int,
                      scaling: float | None) -> torch.Tensor:
        """One query per request, fp32 or bf16 on CPU, through the C++ kernel (csrc/paged_decode.cpp): keys and values
        read in place from the pools via kv_slot, keys 0 .. q_pos (the last `window` of them on sliding-window
        layers) -> [B_b, H, D]. Same mask and softmax as attend_decodes, without the gathered copies."""
        if "kernel" not in self.masks:
            self.masks["kernel"] = (self.q_index[:, 0].contiguous(), (self.q_pos[:, 0] + 1).contiguous())
        rows, lengths = self.masks["kernel"]
        scale = q.shape[-1] ** -0.5 if scaling is None else scaling
        return kernel.decode_attention(q if q.stride(-1) == 1 else q.contiguous(), k_pool, v_pool, rows,
                                       self.kv_slot, lengths, scale, window)

    def head_rows(self, heads_kv: int) -> torch.Tensor:
        """Row of each (request, K/V head, key) in a pool viewed as [S * H_kv, D], request-major (cached)."""
        key = ("rows", heads_kv)
        if key not in self.masks:
            head = torch.arange(heads_kv, device=self.kv_slot.device).view(1, heads_kv, 1)
            self.masks[key] = (self.kv_slot.unsqueeze(1) * heads_kv + head).flatten()
        return self.masks[key]

    def additive_mask(self, window: int, dtype: torch.dtype) -> torch.Tensor | None:
        """mask(window) as 0 / -inf [B_b, 1, K_b] for the decode path (cached like the boolean masks)."""
        allowed = self.mask(window)
        if allowed is None:
            return None
        key = (-1 - window, dtype)
        if key not in self.masks:
            self.masks[key] = torch.zeros(allowed.shape[0], 1, allowed.shape[-1], dtype=dtype,
                                          device=allowed.device).masked_fill_(~allowed.view(allowed.shape[0], 1, -1),
                                                                               float("-inf"))
        return self.masks[key]

    def to(self, device: torch.device) -> "Bucket":
        moved = {name: getattr(self, name).to(device) for name in ("q_index", "q_pos", "kv_slot", "out_rows",
                                                                     "out_index")}
        return Bucket(**moved, causal=self.causal, unmasked=self.unmasked, continued=self.continued)


def _gather(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows [S, H, D], index [B, L] -> [B, L, H, D]; index_select copies whole rows at memcpy speed."""
    return rows.index_select(0, index.flatten()).view(*index.shape, *rows.shape[1:])


@dataclass
class StepPlan:
    cache: PagedKVCache
    slot_mapping: torch.Tensor        # [N] pool slot each new token's K/V goes to
    buckets: list[Bucket]
    kernel: object = None             # the compiled CPU decode kernel (cpu_kernel.load()), or None: torch only
    elsewhere: dict = field(default_factory=dict)   # device -> (slot_mapping, buckets) for layers on other devices

    def on(self, device: torch.device) -> tuple[torch.Tensor, list[Bucket]]:
        if device == self.slot_mapping.device:
            return self.slot_mapping, self.buckets
        if device not in self.elsewhere:
            self.elsewhere[device] = (self.slot_mapping.to(device), [b.to(device) for b in self.buckets])
        return self.elsewhere[device]


def plan_step(segments: Sequence[Segment], cache: PagedKVCache, device: torch.device, kernel=None) -> StepPlan:
    """Host-side preparation of one step: slot mapping and attention buckets, moved to `device` once.
    `kernel`: the CPU decode kernel to attend decodes with (None: the torch path)."""
    size = cache.block_size
    slots = [slot for seg in segments for slot in _slots(seg.block_table, seg.start, seg.keys, size)]
    groups: dict[tuple[int, int], list[tuple[int, Segment]]] = {}
    first = 0
    for seg in segments:
        groups.setdefault(_bucket_key(seg), []).append((first, seg))
        first += seg.length
    buckets = [_bucket(members, size).to(device) for members in groups.values()]
    return StepPlan(cache, torch.tensor(slots, dtype=torch.long).to(device), buckets, kernel)


def _bucket_key(seg: Segment) -> tuple[int, int]:
    """(query class, key class): decodes 0; prompt chunks 8 queries wide up to 64 (1-8, 9-16, ...), then <= 128,
    <= 256, ... queries; <= 256, <= 512, ... keys. (One class for 1-64 queries padded 32 suite prompts of
    2-74 tokens, mean 15, to 74: attention took 12 % of a 512-token prefill step, 4.5 % with 8-wide classes.)
    Decodes (whose gather and products scale with the padded key count) use finer key classes: 64 keys
    wide up to 512, then 8 per power of two (padding <= 12.5 %)."""
    if seg.length == 1:
        width = max(64, 1 << max(0, (seg.keys - 1).bit_length() - 3))
        return 0, (seg.keys - 1) // width + (width.bit_length() << 16)
    short = seg.length <= 64                      # prompt chunks: 8 queries wide up to 64, then powers of two
    query = 1 + (seg.length - 1) // 8 if short else 2 + (seg.length - 1).bit_length()
    return query, max(0, (seg.keys - 1).bit_length() - 8)


def _slots(block_table: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """Pool slot of positions start .. end - 1 (plain ints: a step is mostly one-token decodes)."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _bucket(members: list[tuple[int, Segment]], block_size: int) -> Bucket:
    firsts = torch.tensor([f for f, _ in members])
    starts = torch.tensor([s.start for _, s in members])
    lengths = torch.tensor([s.length for _, s in members])
    keys = starts + lengths
    q_max, k_max = int(lengths.max()), int(keys.max())
    j = torch.minimum(torch.arange(q_max).unsqueeze(0), lengths.unsqueeze(1) - 1)          # [B_b, Q_b]
    key_pos = torch.arange(k_max).unsqueeze(0)
    key_pos = torch.where(key_pos < keys.unsqueeze(1), key_pos, 0)                           # [B_b, K_b]
    width = max(len(s.block_table) for _, s in members)
    tables = torch.tensor([list(s.block_table) + [0] * (width - len(s.block_table)) for _, s in members])
    kv_slot = tables.gather(1, key_pos // block_size) * block_size + key_pos % block_size
    real = (torch.arange(q_max).unsqueeze(0) < lengths.unsqueeze(1)).flatten()
    out_rows = real.nonzero().squeeze(1)
    q_index = firsts.unsqueeze(1) + j
    return Bucket(q_index, starts.unsqueeze(1) + j, kv_slot, out_rows, q_index.flatten()[out_rows],
                  causal=bool((starts == 0).all() and (lengths == q_max).all()),
                  unmasked=q_max == 1 and bool((keys == k_max).all()),
                  continued=len(members) == 1 and q_max > 1 and int(starts[0]) > 0)


# ---- the attention functions ------------------------------------------------------------------------
def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, H, N, D], key/value [1, H_kv, N, D] -> ([1, N, H, D], None); writes K/V into the pools."""
    plan = _PLAN.get()
    if plan is None:
        raise RuntimeError("atv_paged attention used outside a ModelRunner step")
    if kwargs.get("softcap"):
        raise ValueError("attention logit soft-capping is not supported by the ATV engine")
    slot_mapping, buckets = plan.on(query.device)
    k_pool, v_pool = plan.cache.pools(module.layer_idx)
    k_pool.index_copy_(0, slot_mapping, key[0].transpose(0, 1))
    v_pool.index_copy_(0, slot_mapping, value[0].transpose(0, 1))
    q = query[0].transpose(0, 1)                                                        # [N, H, D]
    out = q.new_empty(q.shape)
    window = getattr(module, "sliding_window", None) or 0
    for bucket in buckets:
        out.index_copy_(0, bucket.out_index, bucket.attend(q, k_pool, v_pool, window, scaling, plan.kernel))
    return out.unsqueeze(0), None


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Records each layer's K/V shape during a one-token forward (see probe_layout)."""
    _PROBED.get()[module.layer_idx] = LayerKV(key.shape[1], key.shape[3], key.dtype, key.device)
    out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make both functions known to transformers (idempotent)."""
    AttentionInterface.register(PAGED, paged_attention)
    AttentionInterface.register(PROBE, probe_attention)


@contextmanager
def _attention(model: torch.nn.Module, name: str, var: contextvars.ContextVar, value):
    token = var.set(value)
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous
        var.reset(token)


def paged_step(model: torch.nn.Module, plan: StepPlan):
    """Within the block, the model's attention layers run paged_attention over `plan`."""
    return _attention(model, PAGED, _PLAN, plan)


def masked_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
    """Grouped-query attention with a mask, without copying K/V per query head: query [B, H, Q, D] with
    H = G * H_kv (query head h reads K/V head h // G, as transformers' repeat_kv) is folded to [B, H_kv, G * Q, D]
    and the mask [B, 1, Q, K] repeated G times along the queries. SDPA's accelerator kernels take no masked
    `enable_gqa`, and repeating K/V instead reads and writes G copies of every gathered key per layer."""
    b, h, q, d = query.shape
    groups = h // key.shape[1]
    folded = query.reshape(b, key.shape[1], groups * q, d)
    mask = mask if q == 1 else mask.repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, q, d)


@torch.no_grad()
def probe_layout(model: torch.nn.Module) -> KVLayout:
    """Each attention layer's K/V heads, head size, dtype and device, read from one one-token forward."""
    seen: dict[int, LayerKV] = {}
    device = model.get_input_embeddings().weight.device
    token = getattr(model.config, "bos_token_id", None)
    token = token if isinstance(token, int) else 0        # not the pad token, which makes transformers warn
    with _attention(model, PROBE, _PROBED, seen):
        model(input_ids=torch.full((1, 1), token, dtype=torch.long, device=device), use_cache=False)
    if not seen:
        raise ValueError(f"{type(model).__name__} ran no attention through transformers' attention interface; "
                         "the ATV engine cannot page its KV cache")
    return KVLayout(dict(sorted(seen.items())))
