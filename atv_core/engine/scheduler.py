"""Iteration-level (continuous) batching with chunked prefill, in plain Python: no torch, testable without a model.

Every engine step computes one packed batch of `Chunk`s under a token budget (`max_num_batched_tokens`):

1. **Decodes first**: every running request with one token left to compute (oldest first). When one needs a
   new KV block and none is free, the newest running request is *preempted*: its blocks are freed and it
   goes back to the front of the waiting queue, to be recomputed later from its prompt and output so far
   (it keeps its vector slot, so the recompute is steered exactly as the first pass was).
2. **Prompt chunks** with what is left of the budget: running requests part-way through their prompt, then
   waiting requests admitted first-come first-served while blocks (for their whole sequence so far), running
   slots and budget allow. Short prompts (at most `long_prompt_tokens` left) go whole. *Long* prompts share
   `long_prefill_chunk` tokens per step (oldest first), so they neither stall the decodes and short prompts
   beside them nor wait for them to finish; a new long prompt that would get no tokens this step is not
   admitted (it would hold its blocks idle) and keeps its place, while shorter ones behind it may go (a
   preempted one is admitted all the same: it holds a vector slot, so nothing may pass it). In a step with
   no decodes the unused budget goes to the prompt chunks (shortest remaining first), so a prompt alone gets
   the whole budget. A waiting request that is not `ready` (its vector is still being made) is passed over
   and keeps its place.

A chunk whose last token is the last of its request's sequence `samples`: the runner returns logits for it
and the engine appends a token. A request's `num_computed_tokens` advances when it is scheduled.
The scheduler owns the block accounting (block_manager.py) but never touches tensors.

**Prefix caching** (`prefix_caching`): after each forward the engine calls `cache_computed(chunks)`, which
registers every block those chunks filled under its chain hash. A block's K/V depend on the tokens up to it
and on how they were steered, so its hash carries a *steering key*: None for a block none of whose tokens
is steered (every block of an unsteered request; under position policy `last` every block wholly before
the last prompt token), else the digest of the request's delta (`Request.steering_key`, set by the runner
with the vector slot) and the offset of its first steered token. Before computing a request's tokens, the
full blocks from `num_computed_tokens` on that are already cached are shared instead (at admission, before
allocating; for a running prompt at each step's start). The lookup stops before the block holding the
sequence's last token, which is always computed (its logits pick the next token), so under `last` the
block with the last prompt token is never taken from another request. A request steered under policy
`all` is admitted before its vector exists (the engine attaches vectors to the requests a step admitted);
its lookup waits for `reuse_attached(chunks)`, which the engine calls right after attaching. Requests that
ask for prompt logprobs compute every prompt token (their blocks are still registered for others).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

from atv_core.engine.block_manager import BlockManager, blocks_for, chain_hash, salt_root
from atv_core.engine.request import Request, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 32             # requests holding KV blocks (and vector slots)
    max_num_batched_tokens: int = 512 # tokens computed in one step: decodes + prompt chunks
    max_waiting: int = 256            # new requests waiting beyond this: add() refuses (HTTP 429); preempted
                                      # requests back in the queue were accepted already and do not count
    block_size: int = 16              # tokens per KV block
    num_blocks: int = 4096            # KV blocks the memory budget holds
    long_prompt_tokens: int = 256     # prompts with more tokens left than this are 'long' ...
    long_prefill_chunk: int = 8       # ... and advance this many tokens per step in all beside decodes
    prefix_caching: bool = True       # share computed full blocks between requests with the same prefix
    steer_position: str = "all"       # the runner's position policy: which tokens a vector steers

    def __post_init__(self):
        positive = (self.max_running, self.max_num_batched_tokens, self.block_size, self.num_blocks,
                    self.long_prompt_tokens, self.long_prefill_chunk)
        if min(positive) < 1 or self.max_waiting < 0:
            raise ValueError(f"scheduler limits must be positive, got {self}")
        if self.steer_position not in ("all", "last"):
            raise ValueError(f"steer_position must be 'all' or 'last', got {self.steer_position!r}")
        if self.max_num_batched_tokens < self.max_running:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_running "
                             f"({self.max_running}) so that every running request decodes each step; raise it")


@dataclass(frozen=True)
class Chunk:
    """Tokens [start, start + length) of one request's prompt + output, computed in this step."""
    request: Request
    start: int
    length: int
    samples: bool                     # reaches the end of the sequence: its logits give the next token
    decode: bool                      # one token after a sampled one (not part of a prompt or a recompute)

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Batch:
    chunks: tuple[Chunk, ...]

    @property
    def requests(self) -> tuple[Request, ...]:
        return tuple(c.request for c in self.chunks)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def phase(self) -> str:
        """'decode' when every chunk is a decode, else 'prefill' (the step computes prompt tokens)."""
        return "decode" if all(c.decode for c in self.chunks) else "prefill"


class QueueFull(Exception):
    """The waiting queue is at its bound: retry later."""


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []    # holding KV blocks, oldest admission first
        self.num_preemptions = 0
        self.prefix_queries = 0             # tokens of admitted requests' sequences (prefix caching on)
        self.prefix_hits = 0                # ... of which were found cached instead of computed
        self._unkeyed: set[int] = set()     # id() of requests admitted before their steering key was known

    @property
    def num_queued(self) -> int:
        """Waiting requests never admitted yet (the waiting queue less the preempted ones): max_waiting's count."""
        return sum(1 for r in self.waiting if not r.num_preemptions)

    def add(self, request: Request) -> None:
        if self.num_queued >= self.config.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.config.max_waiting} requests)")
        request.status = Status.WAITING
        self.waiting.append(request)

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens tokens fits the whole KV cache (else it could never run)."""
        return blocks_for(num_tokens, self.config.block_size) <= self.config.num_blocks

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step --------------------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        for request in self.running:
            if _remaining(request) > 1:
                self._reuse(request)
        decodes = self._schedule_decodes()
        budget = self.config.max_num_batched_tokens - len(decodes)
        prefills = self._schedule_prefills(budget, has_decodes=bool(decodes))
        chunks = decodes + prefills
        for chunk in chunks:
            chunk.request.num_computed_tokens = chunk.end
        return Batch(tuple(chunks)) if chunks else None

    def _schedule_decodes(self) -> list[Chunk]:
        chunks: list[Chunk] = []
        for request in list(self.running):
            if request.status is not Status.RUNNING or _remaining(request) != 1:
                continue  # preempted by an older request this step, or still in its prompt
            if self._make_room(request):
                decode = bool(request.output_ids) and request.num_computed_tokens >= request.num_prompt_tokens
                chunks.append(Chunk(request, request.num_computed_tokens, 1, True, decode))
        return chunks

    def _make_room(self, request: Request) -> bool:
        """A block for the request's next token, preempting the newest running requests if none is free.
        False when the request itself was the newest and is now preempted."""
        if request.num_computed_tokens < len(request.block_table) * self.config.block_size:
            return True
        while not self.blocks.can_allocate(1):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is request:
                return False
        request.block_table += self.blocks.allocate(1)
        return True

    def _schedule_prefills(self, budget: int, has_decodes: bool) -> list[Chunk]:
        share = _Share(budget, self.config.long_prefill_chunk, self.config.long_prompt_tokens)
        planned = [[r, share.take(r)] for r in self.running if _remaining(r) > 1]   # part-way prompts
        ready = self._ready_waiting()
        while share.tokens and len(self.running) < self.config.max_running and (request := next(ready, None)):
            found = self._cached_prefix(request)
            if has_decodes and not share.long and not request.num_preemptions and \
                    share.is_long(request.num_tokens - len(found) * self.config.block_size):
                continue  # a new long prompt with no long share left would hold its blocks idle: a later step.
                # Never a preempted one: it keeps its vector slot while it waits, so a request admitted past
                # it could find every slot taken (running + preempted never exceed max_running).
            needed = blocks_for(request.num_tokens, self.config.block_size) - len(found)
            if not self.blocks.can_allocate(needed + self.blocks.num_evictable_in(found)):
                break  # first come, first served for blocks: no ready request overtakes the oldest ready one
            self.waiting.remove(request)
            self._admit(request, found, needed)
            planned.append([request, share.take(request)])
        if not has_decodes:  # nobody's inter-token latency to protect: fill the budget
            for item in sorted(planned, key=lambda p: _remaining(p[0]) - p[1]):
                extra = min(_remaining(item[0]) - item[1], share.tokens)
                item[1] += extra
                share.tokens -= extra
        return [Chunk(r, r.num_computed_tokens, n, n == _remaining(r), False) for r, n in planned if n]

    def _ready_waiting(self):
        """Waiting requests that may start now, oldest first: one whose vector is still being made is skipped
        (it keeps its place) rather than holding up those behind it."""
        return (r for r in list(self.waiting) if r.ready)

    def _admit(self, request: Request, found: list[int], num_blocks: int) -> None:
        """Give the request the cached blocks found for its prefix and fresh ones for the rest."""
        unkeyed = self.config.prefix_caching and not self._keyed(request)
        self.blocks.share(found)
        request.block_table = found + self.blocks.allocate(num_blocks, keep_cached=unkeyed)
        request.num_computed_tokens = len(found) * self.config.block_size
        if self.config.prefix_caching:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += request.num_computed_tokens
        if unkeyed:
            self._unkeyed.add(id(request))
        request.status = Status.RUNNING
        self.running.append(request)

    # ---- prefix caching ----------------------------------------------------------------------------
    def cache_computed(self, chunks: Sequence[Chunk]) -> None:
        """After the forward: make the full blocks these chunks completed findable by their chain hash."""
        if not self.config.prefix_caching:
            return
        size = self.config.block_size
        for chunk in chunks:
            for i in range(chunk.start // size, chunk.end // size):
                self.blocks.register(chunk.request.block_table[i], self._block_hash(chunk.request, i))

    def reuse_attached(self, chunks: Sequence[Chunk]) -> list[Chunk]:
        """After the engine attached this step's vectors: the chunks of requests admitted before their steering
        key was known, moved past the prefix now found cached (same number of tokens)."""
        return [self._moved(c) if id(c.request) in self._unkeyed else c for c in chunks]

    def _moved(self, chunk: Chunk) -> Chunk:
        request = chunk.request
        self._unkeyed.discard(id(request))
        request.num_computed_tokens = chunk.start
        self._reuse(request)
        start = request.num_computed_tokens
        length = min(chunk.length, request.num_tokens - start)
        request.num_computed_tokens = start + length
        return Chunk(request, start, length, start + length == request.num_tokens, chunk.decode)

    def _reuse(self, request: Request) -> None:
        """Swap the request's next (not yet written) blocks for cached ones with the same content."""
        found = self._cached_prefix(request)
        if not found:
            return
        first = request.num_computed_tokens // self.config.block_size
        self.blocks.share(found)
        self.blocks.free(request.block_table[first: first + len(found)])
        request.block_table[first: first + len(found)] = found
        request.num_computed_tokens += len(found) * self.config.block_size
        self.prefix_hits += len(found) * self.config.block_size

    def _cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks holding the request's next full blocks from num_computed_tokens on, up to (not
        including) the block with its last token; no side effects but hashing."""
        size = self.config.block_size
        if not self.config.prefix_caching or request.params.prompt_logprobs is not None \
                or request.num_computed_tokens % size or not self._keyed(request):
            return []
        found = []
        for i in range(request.num_computed_tokens // size, (request.num_tokens - 1) // size):
            block = self.blocks.cached(self._block_hash(request, i))
            if block is None:
                break
            found.append(block)
        return found

    def _keyed(self, request: Request) -> bool:
        """Whether the steering key of every block a lookup can reach is known: unsteered, vector attached,
        or policy `last` before any output (the lookup stops short of the last prompt token)."""
        return not request.steering.steers or request.steering_key is not None or \
            (self.config.steer_position == "last" and not request.output_ids)

    def _block_hash(self, request: Request, i: int) -> bytes:
        """Chain hash of the request's full block i (computed once; tokens and key never change after)."""
        size, hashes = self.config.block_size, request.block_hashes
        while len(hashes) <= i:
            j = len(hashes)
            previous = hashes[-1] if hashes else salt_root(request.cache_salt)
            hashes.append(chain_hash(previous, request.token_slice(j * size, (j + 1) * size),
                                     self._block_steering(request, j)))
        return hashes[i]

    def _block_steering(self, request: Request, i: int) -> bytes | None:
        """Block i's steering key: None when none of its tokens is steered, else the delta's digest and the
        offset of the block's first steered token."""
        if not request.steering.steers:
            return None
        size = self.config.block_size
        first = 0 if self.config.steer_position == "all" else request.num_prompt_tokens - 1
        if (i + 1) * size <= first:
            return None
        if request.steering_key is None:
            raise RuntimeError(f"block {i} of request {request.request_id} is steered but its vector is not attached")
        return request.steering_key + max(0, first - i * size).to_bytes(4, "little")

    # ---- leaving -----------------------------------------------------------------------------------
    def preempt(self, request: Request) -> None:
        """Take back a running request's blocks; it waits at the front and recomputes its tokens later."""
        self._free_blocks(request)
        self._unkeyed.discard(id(request))
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = Status.WAITING
        self.running.remove(request)
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def finish(self, request: Request) -> None:
        """Remove a finished request from whichever queue holds it and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._unkeyed.discard(id(request))
        self._free_blocks(request)

    def _free_blocks(self, request: Request) -> None:
        self.blocks.free(request.block_table[::-1])   # the tail first: recycled before the shared prefix
        request.block_table = []

    def find(self, request_id: str) -> Request | None:
        for request in (*self.running, *self.waiting):
            if request.request_id == request_id:
                return request
        return None


@dataclass
class _Share:
    """What is left of one step's token budget, and of its part for long prompts."""
    tokens: int
    long: int
    long_prompt_tokens: int

    def is_long(self, remaining: int) -> bool:
        """Whether a prompt with this many tokens left to compute is long (shares `long`)."""
        return remaining > self.long_prompt_tokens

    def take(self, request: Request) -> int:
        """Tokens of the request's prompt this step: all of a short one; long ones share `long`."""
        remaining = _remaining(request)
        is_long = self.is_long(remaining)
        n = min(remaining, self.long if is_long else remaining, self.tokens)
        self.tokens -= n
        self.long -= n if is_long else 0
        return n


def _remaining(request: Request) -> int:
    """Tokens of the request's sequence whose K/V are not computed yet."""
    return request.num_tokens - request.num_computed_tokens
