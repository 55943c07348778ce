"""The generator on its own thread (vector_worker.py) on tiny models: the same vectors and outputs as the
synchronous path, pending requests passed over without blocking others, batching of what has arrived,
aborts while pending, generator failures, the thread's own torch thread count, the AsyncEngine path."""
import asyncio
import threading

import pytest
import torch

from atv_core.engine.async_engine import AsyncEngine
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.engine.request import Example, Request, SamplingParams, SteeringSpec, Status
from atv_core.steering.checkpoint import load_generator
from tests.tiny import drain, make_model, make_tiny_generator_dir, make_tokenizer, record_logits

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
TEXTS = ["the first request, fairly long prompt", "hi", "a middle length prompt", "another one, steered"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    model = make_model("llama")
    generator = load_generator(make_tiny_generator_dir(tmp_path_factory.mktemp("g") / "gen"), target=model)
    return model, make_tokenizer(), generator


@pytest.fixture
def gen_calls(parts):
    """Wraps the generator's forward: records (thread name, texts, torch threads) of every call; `gate`
    (set by default) holds calls back while cleared; `entered` is set when a call starts."""
    generator = parts[2]
    real = generator.forward
    record = {"calls": [], "gate": threading.Event(), "entered": threading.Event()}
    record["gate"].set()

    def forward(prompts, use_gate=True):
        record["entered"].set()
        record["gate"].wait(10)
        record["calls"].append((threading.current_thread().name, list(prompts), torch.get_num_threads()))
        if any("bad" in p for p in prompts):
            raise RuntimeError("cannot encode")
        return real(prompts, use_gate)
    generator.forward = forward
    yield record
    record["gate"].set()
    del generator.forward


def _engine(parts, **kw):
    model, tok, gen = parts
    return LLMEngine(model, tok, gen, EngineConfig(**{"max_running": 8, "generator_worker": True, **kw}))


def _request(tok, rid, text, mode="atv", **kw):
    return Request(rid, tok(text)["input_ids"], GREEDY, SteeringSpec(mode, **kw), text)


def _record_vectors(engine) -> dict:
    seen = {}
    original = engine.runner.assign_vector

    def wrapped(request, vector):
        seen[request.request_id] = vector.clone()
        return original(request, vector)
    engine.runner.assign_vector = wrapped
    return seen


def _run(engine, requests):
    vectors, logits = _record_vectors(engine), record_logits(engine)
    for r in requests:
        engine.add_request(r)
    drain(engine)
    return vectors, logits


def _specs(tok, *extra):
    return [_request(tok, "a", TEXTS[0]), _request(tok, "b", TEXTS[1], scale=2.0), _request(tok, "d", TEXTS[3]),
            *extra]


def test_vectors_and_outputs_equal_the_synchronous_path_bit_for_bit(parts, gen_calls):
    """All steered, added before the first step: both paths make the vectors in one run over the same prompts
    and admit the same batch, so everything is bit-equal (the worker's 1 torch thread included). With nothing
    else to compute, the stepping thread may take the queued jobs itself (run_here), or the worker does."""
    tok = parts[1]
    sync_reqs, worker_reqs = _specs(tok), _specs(tok)
    sync_vectors, sync_logits = _run(_engine(parts, generator_worker=False), sync_reqs)
    sync_threads = {name for name, _, _ in gen_calls["calls"]}
    worker = _engine(parts)
    worker_vectors, worker_logits = _run(worker, worker_reqs)
    assert sync_threads == {threading.current_thread().name}
    assert len(gen_calls["calls"]) == 2          # one run each
    assert gen_calls["calls"][1][0] in {"atv-generator", threading.current_thread().name}
    assert sorted(worker_vectors) == sorted(sync_vectors) == ["a", "b", "d"]
    for rid in sync_vectors:
        assert torch.equal(worker_vectors[rid], sync_vectors[rid]), rid
    for s, w in zip(sync_reqs, worker_reqs):
        assert w.output_ids == s.output_ids and w.finish_reason == s.finish_reason == "length"
        assert all(torch.equal(x, y) for x, y in zip(worker_logits[w.request_id], sync_logits[s.request_id]))
        if s.steering.mode == "atv":
            assert w.steering_report.gate == s.steering_report.gate and w.steering_report.generator_s > 0
            assert w.steering_report.vector_norm == s.steering_report.vector_norm
    assert worker.runner.slots_used == 0 and worker.scheduler.blocks.num_used == 0


def test_an_unsteered_request_starts_before_the_vectors_and_the_outputs_stay_the_same(parts):
    """With an unsteered request beside them, the worker path admits it first (a batch of another shape than the
    synchronous path's): vectors bit-equal, tokens equal, logits equal up to fp32 summation order."""
    tok = parts[1]
    sync_reqs, worker_reqs = (_specs(tok, _request(tok, "c", TEXTS[2], "off")) for _ in range(2))
    sync_vectors, sync_logits = _run(_engine(parts, generator_worker=False), sync_reqs)
    worker_vectors, worker_logits = _run(_engine(parts), worker_reqs)
    assert all(torch.equal(worker_vectors[rid], sync_vectors[rid]) for rid in sync_vectors)
    for s, w in zip(sync_reqs, worker_reqs):
        assert w.output_ids == s.output_ids
        for x, y in zip(worker_logits[w.request_id], sync_logits[s.request_id]):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-5)   # the same bound as the join-mid-flight test


def test_a_pending_vector_is_passed_over_and_does_not_block_others(parts, gen_calls):
    tok = parts[1]
    engine = _engine(parts)
    gen_calls["gate"].clear()
    steered, plain = _request(tok, "s", TEXTS[0]), _request(tok, "p", TEXTS[2], "off")
    engine.add_request(steered)     # oldest, but its vector is being made
    engine.add_request(plain)
    for _ in range(3):
        engine.step()
    assert not steered.ready and steered.status is Status.WAITING and steered.num_computed_tokens == 0
    assert len(plain.output_ids) == 3                # prefilled and decoded while the generator was busy
    gen_calls["gate"].set()
    drain(engine)
    assert steered.finish_reason == plain.finish_reason == "length" and steered.steering_report.vector_norm > 0
    assert steered.vector_job is None and engine.scheduler.blocks.num_used == 0


def test_the_worker_batches_what_arrived_while_it_was_busy_and_keeps_each_result_with_its_request(parts, gen_calls):
    tok = parts[1]
    engine = _engine(parts)
    gen_calls["gate"].clear()
    first = _request(tok, "r0", "first")
    engine.add_request(first)
    engine.start_vector_worker()
    assert gen_calls["entered"].wait(10)            # the worker is inside its first run, holding one job
    later = [_request(tok, f"r{i}", text) for i, text in enumerate(TEXTS[1:], 1)]
    for r in later:
        engine.add_request(r)
    vectors = _record_vectors(engine)
    gen_calls["gate"].set()
    drain(engine)
    assert [texts for _, texts, _ in gen_calls["calls"]] == [["first"], TEXTS[1:]]
    with torch.no_grad():
        expected = parts[2]([r.prompt_text for r in later]).vectors.float()   # the same batch, made directly
    for i, r in enumerate(later):
        assert torch.equal(vectors[r.request_id], expected[i]), r.request_id
    assert [r.finish_reason for r in [first, *later]] == ["length"] * 4


def test_abort_while_the_vector_is_pending_leaks_nothing(parts, gen_calls):
    tok = parts[1]
    engine = _engine(parts)
    gen_calls["gate"].clear()
    started, queued = _request(tok, "started", "started"), _request(tok, "queued", "queued")
    plain = _request(tok, "plain", TEXTS[2], "off")
    engine.add_request(started)
    engine.add_request(plain)
    engine.step()                                   # plain runs; the worker holds `started` in its run
    assert gen_calls["entered"].wait(10)
    engine.add_request(queued)
    job = queued.vector_job
    outs = [engine.abort("started"), engine.abort("queued")]
    assert [o.finish_reason for o in outs] == ["abort", "abort"] and job.cancelled
    assert started.vector_job is None and queued.vector_job is None
    seen = engine.vector_worker.completed
    gen_calls["gate"].set()
    drain(engine)
    while engine.vector_worker.completed < seen + 2:  # the run holding `started`, then the one that skips `queued`
        engine.vector_worker.wait_past(engine.vector_worker.completed)
    assert [texts for _, texts, _ in gen_calls["calls"]] == [["started"]]   # the cancelled job never ran
    assert not job.done and not engine.vector_worker._queue
    assert plain.finish_reason == "length" and not engine.has_work() and not engine._generators
    assert engine.scheduler.blocks.num_used == 0 and engine.runner.slots_used == 0
    assert torch.count_nonzero(engine.runner.table) == 0


def test_a_failed_generator_run_fails_only_the_request_at_fault(parts, gen_calls):
    tok = parts[1]
    engine = _engine(parts)
    good, bad, plain = _request(tok, "g", "good"), _request(tok, "b", "bad one"), _request(tok, "p", "x", "off")
    for r in (good, bad, plain):
        engine.add_request(r)
    drain(engine)
    assert bad.finish_reason == "error" and bad.error == "vector generation failed: RuntimeError: cannot encode"
    assert good.finish_reason == plain.finish_reason == "length" and good.steering_report.vector_norm > 0
    assert [texts for _, texts, _ in gen_calls["calls"]] == [["good", "bad one"], ["good"], ["bad one"]]
    assert engine.scheduler.blocks.num_used == 0 and engine.runner.slots_used == 0


def test_requests_that_need_no_generator_never_reach_the_worker(parts, gen_calls):
    tok = parts[1]
    engine = _engine(parts)
    given = Request("v", tok("x")["input_ids"], GREEDY, SteeringSpec("atv"), "x", vector=torch.ones(3, 32))
    reqs = [_request(tok, "off", "x", "off"), _request(tok, "zero", "x", scale=0.0), given]
    for r in reqs:
        engine.add_request(r)
    assert all(r.vector_job is None and r.ready for r in reqs)
    drain(engine)
    assert gen_calls["calls"] == [] and all(r.finish_reason == "length" for r in reqs)


def test_the_worker_runs_on_its_own_torch_thread_count_and_leaves_the_default_alone(parts, gen_calls):
    tok = parts[1]
    before = torch.get_num_threads()
    engine = _engine(parts, generator_threads=2)
    engine.start_vector_worker()
    request = _request(tok, "a", "x")
    engine.add_request(request)
    while not request.ready:          # made by the worker thread (the engine does not step meanwhile)
        threading.Event().wait(0.01)
    drain(engine)
    fresh = []
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert [(name, n) for name, _, n in gen_calls["calls"]] == [("atv-generator", 2)]
    assert torch.get_num_threads() == before and fresh == [before]   # a new thread still gets the default
    engine.close()
    assert not engine.vector_worker._thread.is_alive()


def test_run_here_makes_the_queued_vectors_on_the_calling_thread_unless_a_run_is_under_way(parts, gen_calls):
    """What the engine does when it has nothing else to compute: the queued jobs run on its own thread, in one
    batch; while the worker thread is inside a run, run_here() leaves the queue alone (one run at a time)."""
    from atv_core.engine.vector_worker import VectorWorker
    worker = VectorWorker(parts[2], threads=1, max_batch=8)
    jobs = [worker.submit(text) for text in TEXTS[:2]]
    assert worker.run_here() and all(job.done for job in jobs) and worker.completed == 1
    assert gen_calls["calls"] == [(threading.current_thread().name, TEXTS[:2], torch.get_num_threads())]
    assert not worker.run_here()                     # nothing queued
    gen_calls["gate"].clear()
    held = worker.submit("held")
    worker.start()
    assert gen_calls["entered"].wait(10)             # the worker thread is inside a run
    queued = worker.submit("queued")
    assert not worker.run_here() and not queued.done
    gen_calls["gate"].set()
    worker.wait_past(1, timeout=10)
    deadline = threading.Event()
    while not queued.done:                           # the worker thread takes it next
        deadline.wait(0.01)
    assert held.done and [texts for _, texts, _ in gen_calls["calls"][1:]] == [["held"], ["queued"]]
    worker.close()
    assert not worker.run_here() and not worker._thread.is_alive()


def test_while_the_engine_is_idle_the_worker_thread_leaves_the_queue_to_it(parts, gen_calls):
    """engine_idle(True): jobs wait for the engine's own thread (run_here); engine_idle(False): the worker
    thread takes them."""
    from atv_core.engine.vector_worker import VectorWorker
    worker = VectorWorker(parts[2], threads=1, max_batch=8)
    worker.start()
    worker.engine_idle(True)
    left = worker.submit("left for the engine")
    threading.Event().wait(0.3)                      # time enough for the worker thread to have taken it
    assert not left.done and gen_calls["calls"] == []
    assert worker.run_here() and left.done
    worker.engine_idle(False)
    taken = worker.submit("taken by the worker")
    worker.wait_past(1, timeout=10)
    assert taken.done
    assert [(name, texts) for name, texts, _ in gen_calls["calls"]] == [
        (threading.current_thread().name, ["left for the engine"]), ("atv-generator", ["taken by the worker"])]
    worker.close()


def test_async_engine_keeps_decoding_while_the_generator_works(parts, gen_calls):
    tok = parts[1]
    engine = AsyncEngine(_engine(parts)).start()
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def main():
        plain = engine.generate(tok("abc")["input_ids"], long, SteeringSpec("off"))
        await plain.__anext__()
        gen_calls["gate"].clear()
        steered = engine.generate(tok("hello")["input_ids"], GREEDY, SteeringSpec("atv"), "hello")
        first = asyncio.ensure_future(steered.__anext__())
        while not gen_calls["entered"].is_set():
            await asyncio.sleep(0.01)
        tokens = [await plain.__anext__() for _ in range(5)]   # decodes go on while the generator is held
        assert not first.done()
        gen_calls["gate"].set()
        outs = [await first] + [out async for out in steered]
        rest = [out async for out in plain]
        return tokens, outs, rest
    try:
        tokens, outs, rest = asyncio.run(main())
        assert len(tokens) == 5 and outs[-1].finished and outs[-1].completion_tokens == 6
        assert outs[-1].steering.generator_s > 0 and rest[-1].finish_reason == "length"
        assert [name for name, _, _ in gen_calls["calls"]] == ["atv-generator"]
    finally:
        engine.shutdown()
    assert not engine.engine.vector_worker._thread.is_alive()


def test_the_generator_thread_is_on_by_default_on_accelerators_only(parts):
    """On CPU the generator runs in the step by default (a thread beside the steps competes for the cores);
    generator_worker=True asks for the thread anyway. (The accelerator default is read from the device.)"""
    from atv_core.engine.llm_engine import _vector_worker
    model, tok, gen = parts
    assert LLMEngine(model, tok, gen, EngineConfig(max_running=2)).vector_worker is None
    assert _vector_worker(gen, EngineConfig(), torch.device("cuda")) is not None
    assert _vector_worker(gen, EngineConfig(generator_worker=False), torch.device("cuda")) is None
    assert _vector_worker(None, EngineConfig(generator_worker=True), torch.device("cpu")) is None


def test_an_idle_async_engine_makes_the_vectors_on_its_own_thread(parts, gen_calls):
    """Nothing to step: the engine thread takes the queued job itself (all its torch threads) instead of
    napping while the one-thread worker makes it."""
    tok = parts[1]
    engine = AsyncEngine(_engine(parts)).start()

    async def main():
        await asyncio.sleep(0.2)                     # the loop has found nothing to step and said so
        return [out async for out in engine.generate(tok("hello")["input_ids"], GREEDY, SteeringSpec("atv"),
                                                     "hello")]
    try:
        outs = asyncio.run(main())
        assert outs[-1].finished and outs[-1].completion_tokens == 6 and outs[-1].steering.generator_s > 0
        assert [name for name, _, _ in gen_calls["calls"]] == ["atv-engine"]
    finally:
        engine.shutdown()


def test_examples_reach_the_worker_in_the_stored_format(parts, gen_calls):
    import copy
    from dataclasses import replace

    model, tok, gen = parts
    reading = copy.copy(gen)
    reading.config = replace(gen.config, max_examples=2)
    engine = LLMEngine(model, tok, reading, EngineConfig(max_running=2))
    examples = (Example("hot", "cold"),)
    request = _request(tok, "e", "big ->", examples=examples)
    engine.add_request(request)
    drain(engine)
    assert gen_calls["calls"][0][1] == [reading.format_input("big ->", examples)]


def test_the_scheduler_passes_over_requests_that_are_not_ready_and_keeps_their_place():
    """Plain scheduler, no model: a pending job (anything with .done) holds back only its own request."""
    from types import SimpleNamespace

    from atv_core.engine.scheduler import Scheduler, SchedulerConfig

    scheduler = Scheduler(SchedulerConfig(max_running=4, max_num_batched_tokens=64, block_size=4, num_blocks=64))
    reqs = [Request(f"r{i}", [1, 2, 3], SamplingParams()) for i in range(4)]
    reqs[0].vector_job, reqs[2].vector_job = SimpleNamespace(done=False), SimpleNamespace(done=False)
    for r in reqs:
        scheduler.add(r)
    batch = scheduler.schedule()
    assert [c.request.request_id for c in batch.chunks] == ["r1", "r3"]
    assert list(scheduler.waiting) == [reqs[0], reqs[2]]          # still first in line, in their order
    reqs[2].vector_job.done = True
    assert [c.request.request_id for c in scheduler.schedule().chunks] == ["r2"]
    assert list(scheduler.waiting) == [reqs[0]] and scheduler.schedule() is None


def test_a_process_that_never_closes_its_engine_still_exits_cleanly(tmp_path):
    """A script that uses the engine and just ends (no close()) must exit 0: without the worker joined at
    exit, a process that had set torch's thread count aborted ("terminate called ...", rc 134)."""
    import subprocess
    import sys
    from pathlib import Path
    script = f"""
import torch; torch.set_num_threads(2)
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.engine.request import Request, SamplingParams, SteeringSpec
from atv_core.steering.checkpoint import load_generator
from tests.tiny import drain, make_model, make_tiny_generator_dir, make_tokenizer
model, tok = make_model("llama"), make_tokenizer()
gen = load_generator(make_tiny_generator_dir({str(tmp_path / 'gen')!r}), target=model)
engine = LLMEngine(model, tok, gen, EngineConfig(max_running=2, generator_worker=True))
engine.add_request(Request("a", tok("hello")["input_ids"], SamplingParams(max_tokens=2), SteeringSpec("atv"), "hello"))
drain(engine)
print("finished")
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert "finished" in done.stdout, done.stderr[-2000:]
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_closed_gate_gives_no_vector_and_the_output_of_steering_off(parts, monkeypatch):
    """A gate below the checkpoint's gate_open (0.5 by default) zeroes the request's vector (a soft gate of ~0.01
    still moves greedy tokens), and a zero delta takes no vector slot: the request is served exactly as steering
    off; an open gate still steers. A checkpoint with gate_open 0.8 closes the gate of 0.7 too."""
    from dataclasses import replace
    from atv_core.engine import vector_worker
    from atv_core.steering.generator import GeneratorOutput
    model, tok, generator = parts
    real = generator.forward

    def forward(prompts, use_gate=True):   # the real vectors, gates of 0.3 (closed) and 0.7 (open), alternately
        out = real(prompts, use_gate=False)
        gates = torch.tensor([0.3 if i % 2 == 0 else 0.7 for i in range(len(prompts))])
        return GeneratorOutput(vectors=out.vectors * gates.view(-1, 1, 1), gates=gates, pooled=out.pooled)

    monkeypatch.setattr(generator, "forward", forward)
    vectors, gates = vector_worker.generate(generator, TEXTS[:2])
    assert gates == pytest.approx([0.3, 0.7]) and not vectors[0].any() and vectors[1].abs().sum() > 0
    monkeypatch.setattr(generator, "config", replace(generator.config, gate_open=0.8))
    assert not vector_worker.generate(generator, TEXTS[:2])[0].any()
    monkeypatch.setattr(generator, "config", replace(generator.config, gate_open=0.5))
    engine = LLMEngine(model, tok, generator, EngineConfig(max_running=8, generator_worker=False))
    logits = record_logits(engine)
    closed, opened = (Request(f"r{i}", tok(t)["input_ids"], GREEDY, SteeringSpec("atv"), t)
                      for i, t in enumerate(TEXTS[:2]))
    plain = [Request(f"p{i}", tok(t)["input_ids"], GREEDY, SteeringSpec("off"), t) for i, t in enumerate(TEXTS[:2])]
    for request in (closed, opened, *plain):
        engine.add_request(request)
    engine.step()
    assert closed.vector_slot == 0 and opened.vector_slot != 0
    assert closed.steering_report.gate == pytest.approx(0.3) and closed.steering_report.vector_norm == 0
    drain(engine)
    assert closed.output_ids == plain[0].output_ids and opened.output_ids != plain[1].output_ids
    assert torch.equal(logits["r0"][0], logits["p0"][0])   # the same first-step logits, bit for bit
