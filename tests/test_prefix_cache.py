"""Prefix caching: shared full blocks where steering makes their K/V equal, never where it does not.

Block accounting without torch (reference counts, eviction, which blocks a lookup may take under each
position policy), then the engine on a tiny random model: reuse happens for steering off, identical vectors
and policy `last` with different vectors, not for `all` with different vectors, and in every case the
greedy tokens equal and the logits match the engine without prefix caching."""
import random

import pytest
import torch

from atv_core.engine.block_manager import BlockManager
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.engine.request import Request, SamplingParams, SteeringSpec
from atv_core.engine.scheduler import Scheduler, SchedulerConfig
from atv_core.steering.checkpoint import load_generator
from tests.tiny import drain, kv_budget, make_model, make_tiny_generator_dir, make_tokenizer, record_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _ids(n, seed):
    return random.Random(seed).choices(range(10, 200), k=n)


# ---- block accounting (no model) ------------------------------------------------------------------------
def test_shared_blocks_are_counted_and_freed_ones_stay_findable_until_recycled():
    blocks = BlockManager(4, 4)
    a = blocks.allocate(2)
    blocks.register(a[0], b"h0")
    blocks.share([a[0]])                             # a second request holds block 0
    blocks.free(a[::-1])
    assert blocks.num_used == 1 and blocks.cached(b"h0") == a[0]
    blocks.free([a[0]])
    assert blocks.num_used == 0 and blocks.num_free == 4 and blocks.num_cached == 1
    assert blocks.allocate(1) == [1]                 # a block holding nothing reusable first ...
    assert blocks.allocate(1) == [0] and blocks.cached(b"h0") is None   # ... then, before growing, evict
    with pytest.raises(RuntimeError, match="freed twice"):
        blocks.free([3])


def _scheduler(position="all", caching=True):
    return Scheduler(SchedulerConfig(max_running=4, max_num_batched_tokens=64, block_size=4, num_blocks=64,
                                     long_prompt_tokens=64, long_prefill_chunk=4, prefix_caching=caching,
                                     steer_position=position))


def _computed(s, batch):
    """What the engine does after a forward: register the blocks, append a token to sampling chunks."""
    s.cache_computed(batch.chunks)
    for chunk in batch.chunks:
        if chunk.samples:
            chunk.request.output_ids.append(7)


def _plain(rid, ids, **params):
    return Request(rid, ids, SamplingParams(**params), SteeringSpec("off"))


def _steered(i, ids, key, **params):
    r = Request(f"r{i}", ids, SamplingParams(**params), SteeringSpec("atv"))
    r.steering_key = key                             # as the runner sets it with the vector slot
    return r


def test_admission_shares_full_prefix_blocks_but_never_the_block_with_the_last_token():
    s = _scheduler()
    first = _plain("a", list(range(1, 14)))          # 13 tokens: blocks 0-2 full
    s.add(first)
    _computed(s, s.schedule())
    same = _plain("b", list(range(1, 14)))
    s.add(same)
    batch = s.schedule()
    assert [(c.request.request_id, c.start, c.length) for c in batch.chunks] == [("a", 13, 1), ("b", 12, 1)]
    assert same.block_table[:3] == first.block_table[:3] and same.block_table[3] != first.block_table[3]
    aligned = _plain("c", list(range(1, 13)))        # 12 tokens: the last fills block 2
    s.add(aligned)
    s.schedule()
    assert aligned.num_computed_tokens == 12 and aligned.block_table[:2] == first.block_table[:2]
    assert aligned.block_table[2] != first.block_table[2]              # recomputed: its logits pick a token
    assert (s.prefix_queries, s.prefix_hits) == (13 + 13 + 12, 12 + 8)


def test_a_cache_salt_shares_blocks_only_with_the_same_salt():
    """vLLM's cache_salt: block 0's hash chains from the salt, so a prompt is found only by requests with its salt."""
    s = _scheduler()
    ids = list(range(1, 14))                         # blocks 0-2 full and shareable
    first = _plain("a", ids)
    first.cache_salt = "tenant-1"
    s.add(first)
    _computed(s, s.schedule())
    for rid, salt, hits in (("unsalted", None, 0), ("other", "tenant-2", 0), ("same", "tenant-1", 12)):
        request = _plain(rid, ids)
        request.cache_salt = salt
        before = s.prefix_hits
        s.add(request)
        _computed(s, s.schedule())
        assert s.prefix_hits - before == hits, rid
        assert (set(request.block_table[:3]) == set(first.block_table[:3])) == bool(hits), rid


@pytest.mark.parametrize("position, shared", [("all", 0), ("last", 8)])
def test_different_vectors_share_only_unsteered_blocks(position, shared):
    s = _scheduler(position)
    ids = list(range(1, 14))                         # last prompt token 12 lies in block 3
    a = _steered(0, ids, b"vector-a")
    s.add(a)
    _computed(s, s.schedule())
    b = _steered(1, ids[:10] + [99, 98, 97], b"vector-b")
    s.add(b)
    batch = s.schedule()
    assert [c.start for c in batch.chunks if c.request is b] == [shared]
    assert set(b.block_table) & set(a.block_table) == set(a.block_table[: shared // 4])


def test_under_last_a_block_steered_for_one_request_is_not_shared_with_one_that_leaves_it_unsteered():
    s = _scheduler("last")
    a = _steered(0, list(range(1, 14)), b"v")       # steered from token 12: block 3 holds tokens 12-15
    s.add(a)
    for _ in range(5):                               # prompt, then 4 decodes: tokens 0-16 computed
        _computed(s, s.schedule())
    b = _steered(1, a.prompt_ids + a.output_ids[:4] + [50, 51, 52], b"v")  # same tokens; steered from 19
    s.add(b)
    batch = s.schedule()
    assert [c.start for c in batch.chunks if c.request is b] == [12]
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]


def test_identical_vectors_share_steered_blocks_and_a_recompute_finds_its_own():
    s = _scheduler("all")
    a, b = _steered(0, list(range(1, 14)), b"v"), _steered(1, list(range(1, 14)), b"v")
    s.add(a)
    _computed(s, s.schedule())
    s.add(b)
    s.schedule()
    assert b.block_table[:3] == a.block_table[:3]
    s.preempt(a)
    s.schedule()                                     # a comes back: 13 prompt + 1 output token
    assert a.num_computed_tokens == 14 and s.blocks.num_used == len(set(a.block_table) | set(b.block_table))


def test_a_vector_not_yet_attached_under_all_is_looked_up_after_attaching():
    s = _scheduler("all")
    a = _steered(0, list(range(1, 14)), b"v")
    s.add(a)
    _computed(s, s.schedule())
    b = _steered(1, list(range(1, 14)), None)       # the engine attaches vectors after schedule()
    s.add(b)
    batch = s.schedule()
    assert [(c.start, c.length) for c in batch.chunks if c.request is b] == [(0, 13)]
    b.steering_key = b"v"
    moved = s.reuse_attached(batch.chunks)
    assert [(c.start, c.length, c.samples) for c in moved if c.request is b] == [(12, 1, True)]
    assert b.num_computed_tokens == 13 and b.block_table[:3] == a.block_table[:3] and s.blocks.num_used == 5


def test_prompt_logprobs_requests_and_a_disabled_cache_compute_everything():
    for s, params in ((_scheduler(), dict(prompt_logprobs=0)), (_scheduler(caching=False), {})):
        a = _plain("a", list(range(1, 14)))
        s.add(a)
        _computed(s, s.schedule())
        b = _plain("b", list(range(1, 14)), **params)
        s.add(b)
        s.schedule()
        assert b.num_computed_tokens == 13 and not set(b.block_table) & set(a.block_table)


# ---- the engine on a tiny model -------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["all", "last"])
def steered(request, tmp_path_factory):
    model = make_model("llama")
    path = make_tiny_generator_dir(tmp_path_factory.mktemp(request.param) / "gen", position=request.param)
    return model, make_tokenizer(), load_generator(path, target=model)


PREFIX = _ids(22, 5)                                 # 5 full blocks of 4 tokens, then 2 more


def _requests(case, layers, prompts):
    vectors = [torch.randn(layers, 32, generator=torch.Generator().manual_seed(i if case == "different" else 0))
               for i in range(len(prompts))]
    return [Request(f"r{i}", p, GREEDY, SteeringSpec("off" if case == "off" else "atv"), f"prompt {i}",
                    vector=None if case == "off" else vectors[i]) for i, p in enumerate(prompts)]


def _serve(parts, case, caching, prompts, together, **config):
    model, tok, gen = parts
    engine = LLMEngine(model, tok, gen, EngineConfig(max_running=4, block_size=4, enable_prefix_caching=caching,
                                                     **config))
    logits = record_logits(engine)
    reqs = _requests(case, len(engine.runner.steer_layers), prompts)
    for r in reqs:
        engine.add_request(r)
        if not together:
            drain(engine)
    drain(engine)
    assert engine.scheduler.blocks.num_used == 0 and engine.runner.slots_used == 0
    return {r.request_id: (r.output_ids, logits[r.request_id]) for r in reqs}, engine.stats()


def _assert_same(got, want):
    for rid, (tokens, logits) in want.items():
        assert got[rid][0] == tokens, rid
        for a, b in zip(got[rid][1], logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)   # fp32, another summation order


@pytest.mark.parametrize("case", ["off", "same", "different"])
def test_reuse_where_steering_allows_it_and_outputs_equal_the_path_without(steered, case):
    policy = steered[2].config.position
    prompts = [PREFIX + _ids(3, 10 + i) for i in range(3)]
    want, off = _serve(steered, case, False, prompts, together=False)
    got, stats = _serve(steered, case, True, prompts, together=False)
    _assert_same(got, want)
    reused = 0 if case == "different" and policy == "all" else 2 * 20   # requests 2 and 3 share 5 blocks
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (3 * 25, reused)
    assert off.prefix_cache_hits == 0
    if case == "different":
        assert want["r0"][0] != want["r1"][0]        # the vectors do change what is generated


def test_the_block_with_the_last_prompt_token_is_recomputed_under_last(steered):
    if steered[2].config.position != "last":
        pytest.skip("policy last only")
    prompts = [PREFIX + [77, 78] for _ in range(3)]  # 24 tokens: the last prompt token opens ... ends block 5
    want, _ = _serve(steered, "different", False, prompts, together=False)
    got, stats = _serve(steered, "different", True, prompts, together=False)
    _assert_same(got, want)
    assert stats.prefix_cache_hits == 2 * 20        # blocks 0-4 only, though block 5 holds the same tokens


@pytest.mark.parametrize("case", ["off", "same", "different"])
def test_concurrent_chunked_prompts_reuse_mid_prompt_and_match(steered, case):
    prompts = [PREFIX * 2 + _ids(3, 10 + i) for i in range(4)]
    chunky = dict(max_num_batched_tokens=16, long_prompt_tokens=6, long_prefill_chunk=5)
    want, _ = _serve(steered, case, False, prompts, together=True, **chunky)
    got, stats = _serve(steered, case, True, prompts, together=True, **chunky)
    _assert_same(got, want)
    policy = steered[2].config.position
    assert (stats.prefix_cache_hits == 0) == (case == "different" and policy == "all")


def test_random_shared_prefixes_under_preemption_generate_what_the_path_without_generates():
    model, tok = make_model("llama"), make_tokenizer()
    rng = random.Random(1)
    prefixes = [_ids(n, 100 + n) for n in (0, 9, 17, 26)]
    vectors = [torch.randn(3, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    work = [(rng.choice(prefixes) + _ids(rng.randint(1, 9), i), rng.choice([None, *vectors]), rng.randint(1, 8))
            for i in range(60)]
    runs = []
    for caching in (False, True):
        engine = LLMEngine(model, tok, None, EngineConfig(max_running=8, block_size=4, enable_prefix_caching=caching,
                                                          kv_cache_bytes=kv_budget(model, 20)))
        reqs = [Request(f"r{i}", ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                        SteeringSpec("off" if v is None else "atv"), "p", vector=v) for i, (ids, v, n) in enumerate(work)]
        for r in reqs:
            engine.add_request(r)
        drain(engine)
        runs.append(([r.output_ids for r in reqs], engine.stats(), engine.scheduler.num_preemptions))
    assert runs[1][0] == runs[0][0]
    assert runs[1][1].prefix_cache_hits > 50 and runs[1][2] > 0 and runs[1][1].kv_blocks_used == 0
