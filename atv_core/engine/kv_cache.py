"""Paged KV storage: for every attention layer one K pool and one V pool of token slots, grown lazily.

    pool[layer]: K, V  [capacity * block_size, H_kv, D]     slot = block * block_size + offset

Block ids come from the scheduler's BlockManager (block_manager.py, lowest id first); the pools only hold
the tensors, and never more than `max_blocks`, the number the memory budget allows. How they get there:
- on CPU every pool is allocated at its full size once, untouched: the OS backs a page only when a slot in
  it is first written, so resident memory follows the highest block in use (`high_water`) with no copies.
  (Growing by doubling and copying, as before, left each outgrown pool's pages in malloc's heap: measured
  on the mixed scenario, 31 short + one 7k-token prompt, peak RSS 1586 MiB growing vs 1450 MiB allocated
  once.)
- on accelerators, where an allocation is resident at once, the pools start empty and grow (doubling, one
  layer at a time, so a growth step copies at most one layer's pool at once) to cover the highest block in
  use, and the outgrown pools are handed back to the device.
Slots are never zeroed: the attention (attention.py) reads only slots its step has written.
Each layer's pool lives on the device of that layer's keys (layers may be spread over devices).

`KVLayout` says how many bytes a token costs; it is read from the model itself by one probe forward
(attention.py), so every architecture's head count and head size are right without per-model code.
This module knows nothing of requests or attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

CPU_BUDGET_CAP = 2 << 30              # default CPU budget: at most 2 GiB ...
CPU_BUDGET_SHARE = 0.25               # ... and at most this share of the memory available at start


@dataclass(frozen=True)
class LayerKV:
    heads: int                        # key/value heads
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.heads * self.head_dim * self.dtype.itemsize   # K and V


@dataclass(frozen=True)
class KVLayout:
    layers: dict[int, LayerKV]        # attention layer index -> its K/V shape

    @property
    def bytes_per_token(self) -> int:
        return sum(l.bytes_per_token for l in self.layers.values())


def default_budget(layout: KVLayout, cuda_fraction: float) -> int:
    """Bytes for the KV cache (all layers) when none is set: on CUDA, `cuda_fraction` of each GPU's free memory
    now for the layers it holds (a target spread by device_map: the GPU that fills first bounds the whole
    budget); elsewhere min(2 GiB, a quarter of the memory available now)."""
    per_device: dict[torch.device, int] = {}
    for spec in layout.layers.values():
        per_device[spec.device] = per_device.get(spec.device, 0) + spec.bytes_per_token
    gpus = [device for device in per_device if device.type == "cuda"]
    if gpus:
        return min(int(torch.cuda.mem_get_info(device)[0] * cuda_fraction * layout.bytes_per_token / per_device[device])
                   for device in gpus)
    return min(CPU_BUDGET_CAP, int(_available_ram() * CPU_BUDGET_SHARE))


def _available_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo: set the KV cache budget explicitly")


@dataclass
class PagedKVCache:
    layout: KVLayout
    block_size: int
    max_blocks: int
    capacity: int = 0                 # blocks allocated in every pool
    high_water: int = 0               # 1 + the highest block reserved so far (on CPU: what is resident)
    k: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [capacity * block_size, H_kv, D]
    v: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the pools as allocated (on CPU the whole budget, mostly never touched)."""
        return self.capacity * self.block_size * self.layout.bytes_per_token

    @property
    def touched_bytes(self) -> int:
        """Bytes of the blocks up to the high-water mark: the KV memory actually backed."""
        return self.high_water * self.block_size * self.layout.bytes_per_token

    def reserve(self, num_blocks: int) -> None:
        """Make every pool hold at least num_blocks blocks (at most max_blocks; see the module docstring)."""
        if num_blocks > self.max_blocks:
            raise RuntimeError(f"{num_blocks} KV blocks needed but the budget holds {self.max_blocks}")
        self.high_water = max(self.high_water, num_blocks)
        if num_blocks <= self.capacity:
            return
        if all(spec.device.type == "cpu" for spec in self.layout.layers.values()):
            new = self.max_blocks
        else:
            new = max(self.capacity, 16)
            while new < num_blocks:
                new *= 2
            new = min(new, self.max_blocks)
        for index, spec in self.layout.layers.items():
            self.k[index] = self._grown(self.k.get(index), spec, new)
            self.v[index] = self._grown(self.v.get(index), spec, new)
        self.capacity = new
        if any(spec.device.type == "cuda" for spec in self.layout.layers.values()):
            torch.cuda.empty_cache()          # hand the outgrown pools back instead of caching them

    def _grown(self, old: torch.Tensor | None, spec: LayerKV, blocks: int) -> torch.Tensor:
        pool = torch.empty(blocks * self.block_size, spec.heads, spec.head_dim, dtype=spec.dtype, device=spec.device)
        if old is not None:
            pool[: old.shape[0]] = old
        return pool

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]
