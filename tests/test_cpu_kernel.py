"""The C++ decode-attention kernel (atv_core/engine/cpu_kernel.py): the same outputs as the torch path on
padded buckets, grouped-query and sliding-window layers, and the same tokens through the engine; the engine
keeps the torch path when the kernel cannot be built. Needs g++ (the kernel is compiled on first use)."""
import logging
import random
import shutil

import pytest
import torch

from atv_core.engine import cpu_kernel
from atv_core.engine.attention import Segment, plan_step
from atv_core.engine.kv_cache import KVLayout, LayerKV, PagedKVCache
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.engine.request import Request, SamplingParams, SteeringSpec
from tests.tiny import drain, make_model, make_tokenizer, record_logits

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler: the engine uses the torch path")


@pytest.fixture(scope="module")
def kernel():
    module = cpu_kernel.load()
    assert module is not None, "g++ is installed but the kernel did not build: see the log"
    return module


def _decode_plan(heads_kv: int, dim: int, seed: int, dtype=torch.float32):
    """Ten decodes of 1-190 keys on shuffled blocks of a random pool -> (plan, k_pool, v_pool, segments)."""
    rng = random.Random(seed)
    size = 4
    cache = PagedKVCache(KVLayout({0: LayerKV(heads_kv, dim, dtype, torch.device("cpu"))}), size, 200)
    cache.reserve(200)
    k_pool, v_pool = cache.pools(0)
    k_pool.normal_(), v_pool.normal_()
    blocks = list(range(200))
    rng.shuffle(blocks)                                          # blocks out of order, like a busy pool
    segments, used = [], 0
    for keys in [1, 2, 7, 33, 60, 64, 65, 100, 130, 190]:       # several buckets, padded inside each
        need = -(-keys // size)
        segments.append(Segment(keys - 1, 1, blocks[used:used + need]))
        used += need
    plan = plan_step(segments, cache, torch.device("cpu"))
    assert len(plan.buckets) > 1 and any(b.kv_slot.shape[0] > 1 for b in plan.buckets)
    return plan, k_pool, v_pool, segments


@pytest.fixture(params=[1, 8], ids=["1 thread", "8 threads"])
def threads(request):
    """The kernel splits work per request (all K/V heads) when it has >= 2 requests per thread, else per (request,
    K/V head): with buckets of 2-6 decodes, 1 thread takes the first split and 8 threads the second."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("heads,heads_kv,window", [(6, 2, 0), (4, 4, 0), (6, 3, 5), (8, 2, 40)])
def test_kernel_equals_the_torch_decode_path(kernel, threads, heads, heads_kv, window):
    torch.manual_seed(0)
    dim = 16
    plan, k_pool, v_pool, segments = _decode_plan(heads_kv, dim, heads + window)
    q = torch.randn(len(segments), heads, dim)
    for bucket in plan.buckets:
        want = bucket.attend_decodes(q, k_pool, v_pool, window, None)
        got = bucket.attend_kernel(kernel, q, k_pool, v_pool, window, None)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)           # summation order only
        scaled = bucket.attend_kernel(kernel, q, k_pool, v_pool, window, 0.3)
        torch.testing.assert_close(scaled, bucket.attend_decodes(q, k_pool, v_pool, window, 0.3), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("heads,heads_kv,window", [(6, 2, 0), (4, 4, 0), (6, 3, 5), (8, 2, 40)])
def test_bf16_kernel_is_the_fp32_computation_rounded_once(kernel, threads, heads, heads_kv, window):
    """bf16 pools and queries: the kernel widens them to fp32 and rounds only its output, so it is within one
    bf16 step (2^-8 relative) of the fp32 decode path run on the same bf16 values."""
    torch.manual_seed(1)
    dim = 64
    plan, k_pool, v_pool, segments = _decode_plan(heads_kv, dim, heads + window, torch.bfloat16)
    q = torch.randn(len(segments), heads, dim).to(torch.bfloat16)
    for bucket in plan.buckets:
        got = bucket.attend_kernel(kernel, q, k_pool, v_pool, window, None)
        assert got.dtype == torch.bfloat16
        want = bucket.attend_decodes(q.float(), k_pool.float(), v_pool.float(), window, None)
        torch.testing.assert_close(got.float(), want, atol=1e-6, rtol=2 ** -8)
        sdpa = bucket.attend(q, k_pool, v_pool, window, None)          # the bf16 torch path (gather + SDPA)
        assert (got.float() - want).abs().max() <= (sdpa.float() - want).abs().max()


def test_kernel_window_reads_only_the_last_keys(kernel):
    """A key outside the window (or past the request's length) changes nothing, however large."""
    cache = PagedKVCache(KVLayout({0: LayerKV(1, 8, torch.float32, torch.device("cpu"))}), 4, 8)
    cache.reserve(8)
    k_pool, v_pool = cache.pools(0)
    k_pool.normal_(), v_pool.normal_()
    plan = plan_step([Segment(9, 1, [0, 1, 2]), Segment(3, 1, [5])], cache, torch.device("cpu"))
    q = torch.randn(2, 1, 8)
    before = [b.attend_kernel(kernel, q, k_pool, v_pool, 4, None) for b in plan.buckets]
    for hidden in (slice(0, 6), slice(10, 12)):   # the first request's keys 0-5 (window 4 of 10), its padding
        k_pool[hidden] += 1e3
        v_pool[hidden] = 1e3
    after = [b.attend_kernel(kernel, q, k_pool, v_pool, 4, None) for b in plan.buckets]
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def _engine_run(model, kernel_on: bool) -> list[tuple[list[int], torch.Tensor]]:
    """Four greedy requests of 3-24 prompt tokens x 12 -> (prompt + output ids, logits [12, V]) per request."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(model, make_tokenizer(), None, EngineConfig(max_running=4, block_size=4,
                                                                   cpu_decode_kernel=kernel_on))
    assert (engine.runner.kernel is not None) == kernel_on
    seen = record_logits(engine)
    reqs = [Request(str(i), random.Random(i).choices(range(10, 200), k=3 + 7 * i), params, SteeringSpec("off"))
            for i in range(4)]
    for r in reqs:
        engine.add_request(r)
    drain(engine)
    assert all(len(r.output_ids) == 12 for r in reqs)
    return [(r.prompt_ids + r.output_ids, torch.stack(seen[r.request_id])) for r in reqs]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_tokens_and_logits_with_and_without_the_kernel(kernel, arch):
    model = make_model(arch)
    for (ids_off, logits_off), (ids_on, logits_on) in zip(_engine_run(model, False), _engine_run(model, True)):
        assert ids_on == ids_off
        torch.testing.assert_close(logits_on, logits_off, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_engine_with_the_kernel_is_as_close_to_fp32_as_the_torch_path(kernel, arch):
    """bf16: the kernel rounds attention once, the torch path per SDPA block, so their greedy tokens may part at
    a near-tie. Each path is compared with an fp32 forward of the same bf16 weights over its own tokens: the
    kernel's logits may be no farther from it than twice the torch path's (measured 0.9-1.4x on the tiny
    layouts), and within 2^-4 of the largest logit (a wrong key, row or window: the logits' own scale)."""
    model = make_model(arch).to(torch.bfloat16)
    reference = make_model(arch).to(torch.bfloat16).float()
    error = {}
    for on in (False, True):
        worst, scale = 0.0, 0.0
        for ids, logits in _engine_run(model, on):
            with torch.no_grad():
                want = reference(torch.tensor([ids[:-1]])).logits[0, -12:]
            worst = max(worst, float((logits.float() - want).abs().max()))
            scale = max(scale, float(want.abs().max()))
        error[on] = worst
    assert 0 < error[True] <= 2 * error[False]
    assert error[True] < 2 ** -4 * scale


def test_a_kernel_that_cannot_be_built_leaves_the_torch_path(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'atv_paged_decode'\ng++: not found")

    cpu_kernel.load.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", broken)
    try:
        with caplog.at_level(logging.WARNING, logger="atv.engine"):
            assert cpu_kernel.load() is None
        assert "the C++ kernel could not be built (g++: not found)" in caplog.text
        engine = LLMEngine(make_model("llama"), make_tokenizer(), None, EngineConfig(max_running=2))
        assert engine.runner.kernel is None
        monkeypatch.setenv("CXX", "no-such-compiler")           # no compiler at all: said before trying
        cpu_kernel.load.cache_clear()
        with caplog.at_level(logging.WARNING, logger="atv.engine"):
            assert cpu_kernel.load() is None
        assert "no C++ compiler to build the kernel ('no-such-compiler' not on PATH)" in caplog.text
        engine.add_request(r := Request("r", [10, 11, 12], SamplingParams(max_tokens=3, temperature=0.0,
                                                                          ignore_eos=True), SteeringSpec("off")))
        drain(engine)
        assert len(r.output_ids) == 3
    finally:
        cpu_kernel.load.cache_clear()


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(monkeypatch, tmp_path, caplog):
    """torch waits forever on a build lock left by a killed process; the loader removes one older than
    STALE_LOCK_S and leaves a recent one (another process building) alone."""
    import os
    import time

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, *a, **k: seen.append(
        (tmp_path / name / "lock").exists()) or "module")
    for age, kept in ((cpu_kernel.STALE_LOCK_S + 60, False), (5, True)):
        lock = tmp_path / f"atv_paged_decode_{cpu_kernel._cpu_fingerprint()}" / "lock"
        lock.parent.mkdir(exist_ok=True)
        lock.touch()
        os.utime(lock, (time.time() - age,) * 2)
        cpu_kernel.load.cache_clear()
        try:
            with caplog.at_level(logging.WARNING, logger="atv.engine"):
                assert cpu_kernel.load() == "module"
        finally:
            cpu_kernel.load.cache_clear()
        assert seen[-1] is kept and lock.exists() is kept
    assert "removing a stale C++ kernel build lock" in caplog.text
