"""ModelRunner: turns a scheduled batch of chunks into one packed forward of the target, returns logits.

Owns all per-model torch state:
- the paged KV cache (kv_cache.py): per-layer pools of token slots, grown lazily up to the memory budget;
  which blocks a request owns is decided by the scheduler and read here from `request.block_table`;
- the steering vector table V [L_sel, S + 1, d], row 0 all zeros (see injection.py), and its slots.

One step = one forward over the packed sequence [1, N] of every chunk's tokens (prompt chunks and decodes
together) with per-token positions, a per-token vector slot, and the "atv_paged" attention (attention.py),
which writes the new K/V into the pools and attends over each request's own tokens. Logits are computed
only for the chunks that end their request's sequence, and (run_scored) for every position of the chunks
whose request asked for prompt logprobs.

Steering slots: token p of a request is steered (slot = its vector slot) under position policy "all"
always, under "last" when p >= (prompt length - 1): the last prompt token and every output token, which is
what the first pass steered, so a request recomputed after preemption is steered exactly as before.
Knows nothing of HTTP, queues or sampling.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from atv_core.engine import cpu_kernel
from atv_core.engine.attention import Segment, paged_step, plan_step, probe_layout, register
from atv_core.engine.kv_cache import KVLayout, PagedKVCache, default_budget
from atv_core.engine.request import Request
from atv_core.engine.scheduler import Chunk
from atv_core.steering.injection import POSITION_POLICIES, steering
from atv_core.steering.layers import find_decoder_layers


class ModelRunner:
    def __init__(self, model: torch.nn.Module, max_slots: int, steer_layers: Sequence[int] | None = None,
                 position: str = "all", layers_path: str | None = None, block_size: int = 16,
                 kv_budget_bytes: int | None = None, cpu_decode_kernel: bool = True, kv_cache_fraction: float = 0.8):
        if position not in POSITION_POLICIES:
            raise ValueError(f"position policy must be one of {POSITION_POLICIES}, got {position!r}")
        register()
        self.model = model
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        n_layers = len(find_decoder_layers(model, layers_path))
        self.layers_path = layers_path
        self.steer_layers = tuple(range(n_layers)) if steer_layers is None else tuple(steer_layers)
        self.position = position
        self.layout: KVLayout = probe_layout(model)
        self.kv_budget_bytes = kv_budget_bytes or default_budget(self.layout, kv_cache_fraction)   # over all layers
        max_blocks = self.kv_budget_bytes // (block_size * self.layout.bytes_per_token)
        self.cache = PagedKVCache(self.layout, block_size, max_blocks)
        self.held: dict[int, Request] = {}      # id(request) -> request with state here (slot, or run once)
        hidden = model.config.hidden_size
        self.table = torch.zeros(len(self.steer_layers), max_slots + 1, hidden, device=self.device, dtype=self.dtype)
        self.free_slots = list(range(max_slots, 0, -1))
        supported = self.device.type == "cpu" and self.dtype in cpu_kernel.DTYPES
        self.kernel = cpu_kernel.load() if cpu_decode_kernel and supported else None   # decode attention (attention.py)

    @property
    def rows(self) -> list[Request]:
        """Requests the runner holds state for (vector slot or KV) until release()."""
        return list(self.held.values())

    # ---- vector slots -------------------------------------------------------------------------
    @torch.no_grad()
    def assign_vector(self, request: Request, vector: torch.Tensor) -> None:
        """vector [L_sel, d] (already scaled) -> a table slot owned by the request until release()."""
        if not self.free_slots:
            raise RuntimeError("no free vector slot (more requests hold slots than max_running)")
        slot = self.free_slots.pop()
        self.table[:, slot] = vector.to(self.device, self.dtype)
        request.vector_slot = slot
        request.steering_key = _digest(self.table[:, slot])
        self.held[id(request)] = request

    @property
    def slots_used(self) -> int:
        return self.table.shape[1] - 1 - len(self.free_slots)

    # ---- one step -------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """One packed forward over every chunk -> logits [k, V] (fp32) for the k chunks that sample, in order."""
        return self.run_scored(chunks, ())[0]

    @torch.no_grad()
    def run_scored(self, chunks: Sequence[Chunk], scored: Sequence[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """run(), plus the logits of every position of the chunks whose indices are in `scored` (prompt
        logprobs) -> (logits [k, V] of the sampling chunks, {chunk index: logits [chunk length, V]})."""
        ids, positions, slots, keep, sample_rows, spans = [], [], [], [], [], {}
        first = 0
        for i, chunk in enumerate(chunks):               # plain lists, one tensor each at the end: a step of 64
            self.held[id(chunk.request)] = chunk.request  # decodes made 128 small tensors here before
            ids += chunk.request.token_slice(chunk.start, chunk.end)
            positions += range(chunk.start, chunk.end)
            slots += self._slots(chunk)
            if i in scored:
                spans[i] = (len(keep), len(keep) + chunk.length)
                keep += range(first, first + chunk.length)
            elif chunk.samples:
                keep.append(first + chunk.length - 1)
            if chunk.samples:
                sample_rows.append(len(keep) - 1)
            first += chunk.length
        self.cache.reserve(1 + max(max(c.request.block_table) for c in chunks))
        segments = [Segment(c.start, c.length, c.request.block_table) for c in chunks]
        plan = plan_step(segments, self.cache, self.device, self.kernel)
        ids = torch.tensor(ids, dtype=torch.long).view(1, -1)
        logits = self._forward(ids, torch.tensor(positions).view(1, -1), torch.tensor(slots).view(1, -1), plan,
                               keep)                                                    # [K, V]
        sampled = logits if len(sample_rows) == logits.shape[0] else logits[sample_rows]   # usually every row:
        return sampled, {i: logits[a:b] for i, (a, b) in spans.items()}                   # no [k, V] copy

    def _slots(self, chunk: Chunk) -> list[int]:
        """Vector slot of each token of the chunk (0 where the position policy does not steer)."""
        slot = chunk.request.vector_slot
        if not slot or self.position == "all":
            return [slot] * chunk.length
        first = chunk.request.num_prompt_tokens - 1          # policy last: the last prompt token and after
        return [slot if p >= first else 0 for p in range(chunk.start, chunk.end)]

    def _forward(self, ids, positions, slots: torch.Tensor, plan, keep: list[int]) -> torch.Tensor:
        """keep: the packed positions whose logits are wanted, as a plain list: under device_map, accelerate
        moves tensor arguments to the first GPU, while the final hidden states it indexes sit on the last."""
        table = self.table if bool(slots.any()) else None
        with paged_step(self.model, plan), steering(self.model, table, slots.to(self.device), self.steer_layers,
                                                    self.layers_path):
            out = self.model(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                             use_cache=False, logits_to_keep=keep)
        return out.logits[0].float()                                        # [k, V]

    @torch.no_grad()
    def release(self, request: Request) -> None:
        """Forget the request and free its vector slot (its KV blocks are the scheduler's to free)."""
        self.held.pop(id(request), None)
        if request.vector_slot:
            self.table[:, request.vector_slot] = 0
            self.free_slots.append(request.vector_slot)
            request.vector_slot = 0


def _digest(vector: torch.Tensor) -> bytes:
    """The identity of a delta exactly as the table holds it (dtype and bits): the prefix cache's steering key."""
    raw = vector.detach().cpu().contiguous().view(torch.uint8)
    return hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).digest()
