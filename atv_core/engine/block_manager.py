"""Which KV blocks are free, shared or kept for reuse, in plain Python (no torch): the scheduler's accounting
of cache memory.

The KV cache is cut into `num_blocks` blocks of `block_size` token slots (kv_cache.py holds the tensors).
A request owns the blocks listed in its `block_table`; token p of its sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`.

Prefix caching (vLLM's design, as in nano-vllm): a *full* block whose K/V are computed can be `register`ed
under its chain hash (`chain_hash`: the previous block's hash, or for block 0 the request's cache salt if any,
the block's token ids and its steering key),
and another request whose sequence starts with the same blocks shares it instead of recomputing it. Blocks
are reference counted: a block returns to the free pool when its last request lets go of it, and a
registered one keeps its content there (*evictable*), findable by hash, until it is handed out again
(least recently freed first). A partially filled block is never registered, so it is never shared.

Handing out: free blocks holding nothing reusable go lowest id first while their id is below the highest
block ever handed out; past that mark an evictable block is recycled first, and only then does the mark
grow. So the pool's high-water mark (the memory actually touched) still follows the peak number of blocks
in use, and cached content lives in the memory that peak already touched. (One exception: a request whose
lookup must wait until after allocation allocates with `keep_cached`, past the mark rather than evicting.)

This module does not decide who gets blocks or what a block's steering key is (scheduler.py), and never
touches tensors.
"""
from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from typing import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens tokens."""
    return -(-num_tokens // block_size)


def salt_root(salt: str | None) -> bytes | None:
    """What block 0's hash chains from: None, or for a request with a cache salt (vLLM's `cache_salt`) a digest
    of it, so that only requests with the same salt can find each other's blocks."""
    if salt is None:
        return None
    return hashlib.blake2b(b"cache_salt\0" + salt.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def chain_hash(previous: bytes | None, token_ids: Sequence[int], steering: bytes | None) -> bytes:
    """The identity of one full block's K/V: everything before it (`previous`, None for block 0), its tokens
    and how they were steered (None: not at all). 128-bit BLAKE2b, so a collision is out of reach."""
    h = hashlib.blake2b(digest_size=16)
    h.update(previous or b"")
    h.update(array("q", token_ids).tobytes())
    h.update(b"\0" if steering is None else b"\1" + steering)
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV cache needs at least one block of at least one token, got "
                             f"{num_blocks} blocks of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks))            # a min-heap of free blocks holding nothing reusable
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free registered blocks, least recent first
        self._refs: dict[int, int] = {}                 # block in use -> requests holding it
        self._hash_of: dict[int, bytes] = {}            # registered block -> its chain hash
        self._by_hash: dict[bytes, int] = {}
        self._high_water = 0                            # 1 + the highest block id ever handed out

    @property
    def num_free(self) -> int:
        """Blocks that allocate() can hand out (evictable ones included)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Free blocks whose content is kept for reuse."""
        return len(self._evictable)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int, keep_cached: bool = False) -> list[int]:
        """n free blocks; keep_cached: recycle cached content only when no other block is free (for a request
        that looks its prefix up after allocating: its own allocation must not evict what it may find)."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks with {self.num_free} free (check can_allocate first)")
        ids = [self._take_free(keep_cached) for _ in range(n)]
        for block in ids:
            self._refs[block] = 1
        return ids

    def _take_free(self, keep_cached: bool) -> int:
        if self._evictable and (not self._free or (self._free[0] >= self._high_water and not keep_cached)):
            block, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
            return block
        block = heapq.heappop(self._free)
        self._high_water = max(self._high_water, block + 1)
        return block

    def free(self, ids: Sequence[int]) -> None:
        """Let go of blocks (a request's table, last block first, so that its tail is recycled first)."""
        for block in ids:
            refs = self._refs.get(block)
            if refs is None:
                raise RuntimeError(f"KV block {block} freed twice or never allocated")
            if refs > 1:
                self._refs[block] = refs - 1
                continue
            del self._refs[block]
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                heapq.heappush(self._free, block)

    # ---- prefix caching -------------------------------------------------------------------------
    def register(self, block: int, block_hash: bytes) -> None:
        """Make a full, computed block in use findable by its chain hash (once; first holder of a hash wins)."""
        if block not in self._refs:
            raise RuntimeError(f"KV block {block} registered while not in use")
        if block in self._hash_of or block_hash in self._by_hash:
            return
        self._hash_of[block] = block_hash
        self._by_hash[block_hash] = block

    def cached(self, block_hash: bytes) -> int | None:
        """The block holding this content (in use or evictable), if any."""
        return self._by_hash.get(block_hash)

    def num_evictable_in(self, ids: Sequence[int]) -> int:
        """How many of these blocks are free now (sharing them takes them from the free pool)."""
        return sum(1 for block in ids if block in self._evictable)

    def share(self, ids: Sequence[int]) -> None:
        """One more request holds each of these registered blocks."""
        for block in ids:
            if block in self._evictable:
                del self._evictable[block]
                self._refs[block] = 1
            else:
                self._refs[block] += 1
