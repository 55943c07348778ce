"""The paged engine on tiny random models: logits parity with a plain forward through prefill, chunked prefill
and decode on every layout; exact recompute after preemption under both position policies; refusal of a
request the KV budget cannot hold; attention buckets; no leaks after 1,000 random requests (shared prefixes, prefix caching on)."""
import random

import pytest
import torch

from atv_core.engine.attention import Segment, plan_step
from atv_core.engine.llm_engine import EngineConfig, LLMEngine, PromptTooLong
from atv_core.engine.request import Request, SamplingParams, SteeringSpec
from atv_core.engine.scheduler import Chunk
from atv_core.steering.checkpoint import load_generator
from tests.conftest import ARCHS
from tests.tiny import drain, kv_budget, make_model, make_tiny_generator_dir, make_tokenizer, record_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
# a small step budget so that prompts are chunked and chunks share steps with decodes
CHUNKY = dict(max_running=4, max_num_batched_tokens=16, block_size=4, long_prompt_tokens=6, long_prefill_chunk=5)




def _ids(n, seed):
    return random.Random(seed).choices(range(10, 200), k=n)


def chunked_run_against_a_plain_forward(model, reference=None) -> list[tuple[str, torch.Tensor, torch.Tensor, list[int]]]:
    """Three requests through chunked prefill beside decodes (one arriving first, two joining it) ->
    (request id, the engine's logits [T, V], a plain forward's [T, V] by `reference` (default: the model itself),
    the request's prompt + output ids) per request; no block left in use. Shared by the fp32 test below and its
    bf16 twin (test_bf16.py)."""
    engine = LLMEngine(model, make_tokenizer(), None, EngineConfig(**CHUNKY))
    seen = record_logits(engine)
    reqs = [Request("short", _ids(3, 0), GREEDY, SteeringSpec("off")),
            Request("long", _ids(40, 1), GREEDY, SteeringSpec("off")),     # > gemma3's sliding window of 16
            Request("mid", _ids(9, 2), GREEDY, SteeringSpec("off"))]
    engine.add_request(reqs[0])
    engine.step()
    engine.step()
    for r in reqs[1:]:
        engine.add_request(r)
    drain(engine)
    assert engine.scheduler.blocks.num_used == 0
    pairs = []
    for r in reqs:
        with torch.no_grad():
            plain = (reference or model)(torch.tensor([r.prompt_ids + r.output_ids[:-1]])).logits[0]    # [T, V]
        pairs.append((r.request_id, torch.stack(seen[r.request_id]), plain[r.num_prompt_tokens - 1:],
                      r.prompt_ids + r.output_ids))
    return pairs


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_a_plain_forward_through_chunked_prefill_and_decode(arch):
    for request_id, got, want, _ in chunked_run_against_a_plain_forward(make_model(arch)):
        # fp32, other summation order (packed steps, chunked keys): last-bit differences only
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5, msg=f"{arch} {request_id}")


def test_the_long_prompt_was_really_chunked_beside_decodes():
    model = make_model("llama")
    engine = LLMEngine(model, make_tokenizer(), None, EngineConfig(**CHUNKY))
    short, long = Request("s", _ids(3, 0), GREEDY, SteeringSpec("off")), Request("l", _ids(40, 1), GREEDY,
                                                                                  SteeringSpec("off"))
    engine.add_request(short)
    engine.step()
    engine.add_request(long)
    batch = engine.scheduler.schedule()
    assert [(c.request.request_id, c.start, c.length) for c in batch.chunks] == [("s", 3, 1), ("l", 0, 5)]


@pytest.fixture(scope="module", params=["all", "last"])
def steered(request, tmp_path_factory):
    model = make_model("llama")
    path = make_tiny_generator_dir(tmp_path_factory.mktemp(request.param) / "gen", position=request.param)
    return model, make_tokenizer(), load_generator(path, target=model)


def _steered_requests(tok):
    texts = ["the oldest request here", "a second one", "and the newest, preempted"]
    return [Request(f"p{i}", tok(t)["input_ids"], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                    SteeringSpec("atv"), t) for i, t in enumerate(texts)]


def test_a_preempted_request_outputs_what_it_outputs_alone(steered):
    model, tok, gen = steered
    solo = {}
    for r in _steered_requests(tok):
        engine = LLMEngine(model, tok, gen, EngineConfig(max_running=4, block_size=4))
        logits = record_logits(engine)
        engine.add_request(r)
        drain(engine)
        solo[r.request_id] = (r.output_ids, logits[r.request_id])
    assert solo["p0"][0] != solo["p1"][0]
    # 20 blocks of 4 tokens: the three prompts (23 + 12 + 25 bytes) fit, but not their growth by 10 tokens each
    engine = LLMEngine(model, tok, gen, EngineConfig(max_running=4, block_size=4, kv_cache_bytes=kv_budget(model, 20)))
    logits = record_logits(engine)
    reqs = _steered_requests(tok)
    for r in reqs:
        engine.add_request(r)
    drain(engine)
    assert engine.scheduler.num_preemptions > 0 and reqs[-1].num_preemptions > 0
    assert engine.stats().num_preemptions == engine.scheduler.num_preemptions   # what /metrics exports
    for r in reqs:
        assert r.output_ids == solo[r.request_id][0], r.request_id
        for got, want in zip(logits[r.request_id], solo[r.request_id][1]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert engine.scheduler.blocks.num_used == 0 and engine.runner.slots_used == 0


def test_recompute_steers_the_positions_the_first_pass_steered(steered):
    model, tok, gen = steered
    engine = LLMEngine(model, tok, gen, EngineConfig(max_running=2))
    request = Request("r", [5, 6, 7, 8], GREEDY, SteeringSpec("off"), output_ids=[9, 10])
    request.vector_slot = 3
    slots = engine.runner._slots(Chunk(request, 0, 6, True, False))
    policy = gen.config.position
    assert slots == ([3] * 6 if policy == "all" else [0, 0, 0, 3, 3, 3])
    assert engine.runner._slots(Chunk(request, 5, 1, True, True)) == [3]


def test_a_budget_too_small_for_one_request_refuses_it_at_admission():
    model = make_model("llama")
    engine = LLMEngine(model, make_tokenizer(), None,
                       EngineConfig(max_running=1, block_size=4, kv_cache_bytes=kv_budget(model, 5)))
    with pytest.raises(PromptTooLong, match="do not fit the KV cache budget of 20 tokens"):
        engine.add_request(Request("big", _ids(15, 0), GREEDY, SteeringSpec("off")))
    engine.add_request(ok := Request("ok", _ids(12, 0), GREEDY, SteeringSpec("off")))
    drain(engine)
    assert ok.finish_reason == "length" and engine.runner.cache.high_water <= 5 and engine.runner.cache.capacity == 5


def test_decodes_are_not_padded_to_a_long_request():
    model = make_model("llama")
    engine = LLMEngine(model, make_tokenizer(), None, EngineConfig(max_running=4, block_size=4))
    segments = [Segment(1000, 1, list(range(251))), Segment(69, 1, range(300, 318)), Segment(99, 1, range(318, 343)),
                Segment(0, 30, list(range(343, 351))), Segment(600, 20, range(351, 506)), Segment(5, 1, [507, 508])]
    engine.runner.cache.reserve(510)
    plan = plan_step(segments, engine.runner.cache, torch.device("cpu"))
    shapes = sorted((tuple(b.q_index.shape), tuple(b.kv_slot.shape)) for b in plan.buckets)
    # decodes of 70 and 100 keys share a bucket (65-128), the 6-key one has its own (1-64)
    assert shapes == [((1, 1), (1, 6)), ((1, 1), (1, 1001)), ((1, 20), (1, 620)), ((1, 30), (1, 30)),
                      ((2, 1), (2, 100))]
    assert plan.slot_mapping[:3].tolist() == [250 * 4, 317 * 4 + 1, 342 * 4 + 3]


def test_no_leaks_after_1000_random_requests_with_aborts_and_preemptions():
    model = make_model("llama")
    engine = LLMEngine(model, make_tokenizer(), None, EngineConfig(max_running=16, max_waiting=2000, block_size=4,
                                                                   kv_cache_bytes=kv_budget(model, 40)))
    rng = random.Random(0)
    prefixes = [_ids(n, 100 + n) for n in (0, 9, 17, 26)]      # shared prompt prefixes (prefix caching) ...
    vectors = [torch.randn(3, 32) for _ in range(3)]           # ... and recurring vectors (shared under 'all')
    reqs = []
    for i in range(1000):
        params = SamplingParams(max_tokens=rng.randint(1, 8), temperature=rng.choice([0.0, 1.0]), seed=i,
                                ignore_eos=True)
        steered = rng.random() < 0.5          # a precomputed vector: slots without the generator's cost
        prompt = rng.choice(prefixes) + _ids(rng.randint(1, 14), i)
        reqs.append(Request(f"r{i}", prompt, params, SteeringSpec("atv" if steered else "off"),
                            f"prompt {i}", vector=rng.choice(vectors) if steered else None))
        engine.add_request(reqs[-1])
    aborted = set()
    while engine.has_work():
        engine.step()
        if rng.random() < 0.2:
            victim = rng.choice(reqs)
            if engine.abort(victim.request_id) is not None:
                aborted.add(victim.request_id)
    assert engine.scheduler.num_preemptions > 10 and len(aborted) > 20 and engine.stats().prefix_cache_hits > 1000
    for r in reqs:
        if r.request_id in aborted:
            assert r.finish_reason == "abort"
        else:
            assert r.finish_reason == "length" and len(r.output_ids) == r.params.max_tokens, r.request_id
    assert engine.scheduler.blocks.num_free == 40 and engine.scheduler.blocks.num_used == 0
    assert not engine.scheduler.has_work() and engine.runner.rows == [] and not engine._generators
    assert engine.runner.slots_used == 0 and torch.count_nonzero(engine.runner.table) == 0
    assert all(not r.block_table and r.vector_slot == 0 for r in reqs)


def _layout(device: str):
    from atv_core.engine.kv_cache import KVLayout, LayerKV
    return KVLayout({0: LayerKV(2, 4, torch.float32, torch.device(device)),
                     1: LayerKV(2, 4, torch.float32, torch.device(device))})


def test_cpu_pools_are_allocated_once_at_the_budget_and_never_copied():
    from atv_core.engine.kv_cache import PagedKVCache
    cache = PagedKVCache(_layout("cpu"), block_size=4, max_blocks=300)
    cache.reserve(3)
    pointers = [cache.k[0].data_ptr(), cache.v[1].data_ptr()]
    cache.reserve(250)
    assert cache.capacity == 300 and cache.k[0].shape == (1200, 2, 4)
    assert [cache.k[0].data_ptr(), cache.v[1].data_ptr()] == pointers
    assert cache.high_water == 250 and cache.touched_bytes == 250 * 4 * cache.layout.bytes_per_token
    with pytest.raises(RuntimeError, match="301 KV blocks needed but the budget holds 300"):
        cache.reserve(301)


def test_accelerator_pools_grow_by_doubling_up_to_the_budget_and_keep_their_content():
    from atv_core.engine.kv_cache import PagedKVCache
    cache = PagedKVCache(_layout("meta"), block_size=4, max_blocks=300)    # meta: the non-CPU path, no memory
    grown = []
    for need in (3, 16, 17, 40, 200, 299):
        cache.reserve(need)
        grown.append(cache.capacity)
    assert grown == [16, 16, 32, 64, 256, 300]
    assert cache.k[1].shape == (1200, 2, 4) and cache.high_water == 299


def test_the_default_gpu_budget_is_bounded_by_the_gpu_that_fills_first(monkeypatch):
    """device_map: 2 layers on cuda:0 (10 GB free), 1 on cuda:1 (4 GB free), the same K/V size each. At 80 %,
    cuda:1's 3.2 GB hold its third of the cache, so the whole budget is 9.6 GB (cuda:0 alone would allow 12)."""
    from atv_core.engine.kv_cache import KVLayout, LayerKV, default_budget
    spec = dict(heads=2, head_dim=4, dtype=torch.float32)
    gpu0, gpu1 = torch.device("cuda:0"), torch.device("cuda:1")
    layout = KVLayout({0: LayerKV(device=gpu0, **spec), 1: LayerKV(device=gpu0, **spec), 2: LayerKV(device=gpu1, **spec)})
    free = {0: 10 * 10**9, 1: 4 * 10**9}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[device.index], 80 * 10**9))
    assert default_budget(layout, 0.8) == pytest.approx(9.6e9, rel=1e-9)
    one_gpu = KVLayout({i: LayerKV(device=gpu0, **spec) for i in range(3)})
    assert default_budget(one_gpu, 0.8) == 8 * 10**9                    # one GPU: 80 % of its free memory


@pytest.mark.parametrize("queries", [1, 5])
def test_masked_gqa_folds_the_groups_instead_of_repeating_kv(queries):
    """The accelerator path of masked grouped-query attention (attention.masked_gqa) equals SDPA over K/V repeated
    per query head, as transformers' repeat_kv orders them (query head h reads K/V head h // G)."""
    import torch.nn.functional as F
    from atv_core.engine.attention import masked_gqa
    g = torch.Generator().manual_seed(queries)
    shapes = ((3, 6, queries, 8), (3, 2, 11, 8), (3, 2, 11, 8))   # 6 query heads, 2 K/V heads
    query, key, value = (torch.randn(shape, generator=g) for shape in shapes)
    mask = torch.rand(3, 1, queries, 11, generator=g) > 0.4
    mask[..., 0] = True                                                  # every query sees a key
    want = F.scaled_dot_product_attention(query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1),
                                          attn_mask=mask, scale=0.3)
    torch.testing.assert_close(masked_gqa(query, key, value, mask, 0.3), want, rtol=1e-5, atol=1e-6)


def test_a_continued_prompt_chunk_attends_without_a_mask_like_the_masked_path(monkeypatch):
    """A lone prompt chunk after earlier ones (start > 0) runs as prefix attention + causal self-attention
    merged by log-sum-exp (Bucket.attend_continued); the masked SDPA call gives the same outputs."""
    from dataclasses import replace

    from atv_core.engine import attention
    from atv_core.engine.kv_cache import KVLayout, LayerKV, PagedKVCache
    torch.manual_seed(0)
    cache = PagedKVCache(KVLayout({0: LayerKV(2, 16, torch.float32, torch.device("cpu"))}), 4, 40)
    cache.reserve(40)
    k_pool, v_pool = cache.pools(0)
    k_pool.normal_(), v_pool.normal_()
    plan = plan_step([Segment(37, 12, list(range(39, 26, -1)))], cache, torch.device("cpu"))
    (bucket,) = plan.buckets
    assert bucket.continued and not bucket.causal
    flash = attention._CPU_FLASH
    q = torch.randn(12, 6, 16)
    calls = []
    monkeypatch.setattr(attention, "_CPU_FLASH", lambda *a, **k: calls.append(a[4]) or flash(*a, **k))
    got = bucket.attend(q, k_pool, v_pool, 0, None)
    assert calls == [False, True]                      # prefix unmasked, then the chunk's own keys causally
    want = replace(bucket, continued=False).attend(q, k_pool, v_pool, 0, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # a sliding window narrower than the keys keeps the masked path
    windowed = bucket.attend(q, k_pool, v_pool, 20, None)
    torch.testing.assert_close(windowed, replace(bucket, continued=False).attend(q, k_pool, v_pool, 20, None))
