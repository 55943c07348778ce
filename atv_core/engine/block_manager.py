"""Which KV blocks are free, in plain Python (no torch): the scheduler's accounting of cache memory.

The KV cache is cut into `num_blocks` blocks of `block_size` token slots (kv_cache.py holds the tensors).
A request owns the blocks listed in its `block_table`; token p of its sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Free blocks are handed out lowest id first,
so the pool's high-water mark (the memory actually touched) follows the peak number of blocks in use.

This module does not decide who gets blocks (scheduler.py) and never touches tensors.
"""
from __future__ import annotations

import heapq


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV cache needs at least one block of at least one token, got "
                             f"{num_blocks} blocks of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks))            # a min-heap: lowest ids are reused first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free (check can_allocate first)")
        ids = [heapq.heappop(self._free) for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        for block in ids:
            if block not in self._used:
                raise RuntimeError(f"KV block {block} freed twice or never allocated")
            self._used.remove(block)
            heapq.heappush(self._free, block)
