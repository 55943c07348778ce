"""The benchmarks' method, without timing anything: rounds interleaved and rotated, medians, spreads and
ratios from given figures, the closed-batch `generate` baseline token for token against the engine (steering
off and on, both position policies), varied output lengths shared by every variant, the per-step cost run."""
import argparse
import json
import statistics

import pytest
import torch

from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.steering.checkpoint import load_generator
from atv_core.tools import bench, bench_serve
from atv_core.tools.bench_rounds import (difference_summary, median_interval, output_lengths, ratio_summary, round_order,
                                         run_rounds, spread, summarize)
from tests.tiny import make_model, make_tiny_generator_dir, make_tiny_model_dir, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["the first request, fairly long prompt", "hi", "a middle length prompt", "another one, steered here"]


# ---- rounds and their arithmetic (pure) ---------------------------------------------------------------
def test_rounds_run_every_variant_once_per_round_in_rotated_order():
    calls = []
    variants = {name: (lambda name=name: calls.append(name) or f"{name}{len(calls)}") for name in ("a", "b", "c")}
    seen = []
    results = run_rounds(variants, 4, on_run=lambda r, name: seen.append((r, name)))
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert seen == [(r, n) for r in range(4) for n in round_order(["a", "b", "c"], r)]
    assert results == {"a": ["a1", "a6", "a8", "a10"], "b": ["b2", "b4", "b9", "b11"],
                       "c": ["c3", "c5", "c7", "c12"]}
    with pytest.raises(ValueError, match="rounds"):
        run_rounds(variants, 0)


def test_spread_and_ratios_from_given_round_figures():
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == {"median": 3.0, "min": 1.0, "max": 5.0, "q1": 2.0, "q3": 4.0, "n": 5}
    assert spread([7.0]) == {"median": 7.0, "min": 7.0, "max": 7.0, "q1": 7.0, "q3": 7.0, "n": 1}
    # per-round ratios 2, 0.5, 1 -> median 1; medians 4 / 4 -> 1; a drifting pair where they differ:
    r = ratio_summary([2.0, 4.0, 8.0], [1.0, 8.0, 8.0])
    assert r["rounds"] == [2.0, 0.5, 1.0] and r["median_of_round_ratios"] == 1.0
    assert r["ratio_of_medians"] == 4.0 / 8.0 and (r["min"], r["max"]) == (0.5, 2.0)
    d = difference_summary([1.1, 1.3, 1.0], [1.0, 1.0, 1.0])
    assert d["rounds"] == pytest.approx([0.1, 0.3, 0.0]) and d["median_of_round_differences"] == pytest.approx(0.1)
    assert d["median_of_round_fractions"] == pytest.approx(0.1) and d["difference_of_medians"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="pair"):
        ratio_summary([1.0], [1.0, 2.0])
    assert r["interval95"] == median_interval(r["rounds"])
    assert d["fraction_interval95"] == pytest.approx(median_interval([0.1, 0.3, 0.0]))


def test_median_interval_is_a_seeded_bootstrap_that_narrows_with_more_rounds():
    noisy = [0.74, 1.22, 0.93, 1.05, 0.88, 0.97, 1.12, 0.81, 0.95, 1.01, 0.9]
    low, high = median_interval(noisy)
    assert min(noisy) <= low <= statistics.median(noisy) <= high <= max(noisy) and low < high
    assert median_interval(noisy) == (low, high)                                      # seeded: repeatable
    wide, narrow = high - low, (lambda i: i[1] - i[0])(median_interval(noisy * 9))   # the same spread, 9x rounds
    assert narrow < wide / 2
    assert median_interval([0.96] * 7) == (0.96, 0.96)
    with pytest.raises(ValueError, match="no values"):
        median_interval([])
    s = summarize({"x": [1.0, 3.0], "y": [2.0, 2.0], "z": []}, {"x_over_y": ("x", "y"), "z_over_y": ("z", "y")})
    assert s["figures"]["x"]["median"] == 2.0 and "z" not in s["figures"] and list(s["ratios"]) == ["x_over_y"]


def test_engine_figures_are_medians_and_per_round_ratios():
    tps = {"atv": [90.0, 100.0, 120.0], "off": [100.0, 100.0, 100.0],
           "closed_batch_atv": [100.0, 80.0, 150.0], "closed_batch_off": [100.0, 100.0, 160.0]}
    results = {k: [{"tok_per_s": v, "ttft_p50_s": v / 100} for v in vs] for k, vs in tps.items()}
    f = bench.engine_figures(results)
    assert f["tok_per_s"] == {"atv": 100.0, "off": 100.0, "closed_batch_atv": 100.0, "closed_batch_off": 100.0}
    assert f["tok_per_s_rounds"] == tps and f["tok_per_s_spread"]["atv"]["min"] == 90.0
    assert f["ttft_p50_s"]["atv"] == 1.0
    assert f["ratios"]["atv_over_off"] == 1.0                                    # 0.9, 1.0, 1.2
    assert f["ratios"]["atv_over_closed_batch_atv"] == 0.9                       # 0.9, 1.25, 0.8
    assert f["ratio_detail"]["atv_over_closed_batch_atv"]["ratio_of_medians"] == 1.0
    assert "atv_staggered_over_off_staggered" not in f["ratios"]                 # not run


def _serve_round(mode, tok_per_s, ttft):
    pct = {"p50": ttft, "p95": ttft * 2, "p99": ttft * 3}
    return {"mode": mode, "concurrency": 32, "requests": 64, "ttft_s": pct, "itl_s": pct, "e2e_s": pct,
            "req_per_s": tok_per_s / 64, "tok_per_s": tok_per_s, "failures": 0, "seconds": 1.0}


def test_serve_records_and_targets_from_given_rounds():
    atv = bench_serve.level_record([_serve_round("atv", t, s) for t, s in [(95, 1.10), (100, 1.00), (90, 1.30)]])
    off = bench_serve.level_record([_serve_round("off", t, s) for t, s in [(100, 1.00), (100, 1.00), (80, 1.20)]])
    assert atv["tok_per_s"] == 95 and atv["ttft_s"]["p50"] == 1.10 and atv["ttft_s"]["p95"] == 2.20
    assert atv["tok_per_s_spread"]["min"] == 90 and atv["ttft_p50_spread"]["max"] == 1.30
    t = bench_serve.targets([atv, off], {}, 32)
    assert t["http_atv_over_http_off"] == 1.0                                    # 0.95, 1.0, 1.125
    assert t["ratio_detail"]["http_atv_over_http_off"]["ratio_of_medians"] == 0.95
    assert t["ttft_atv_minus_off_s"] == pytest.approx(0.10)                      # 0.10, 0.00, 0.10
    assert t["ttft_atv_minus_off_fraction_of_off"] == pytest.approx(0.1 / 1.2)   # 0.1, 0, 0.0833
    assert bench_serve.targets([atv, off], {}, 64) == {}
    assert "| TTFT p50 atv - off" in bench_serve.table([atv, off], {}, t)


def test_output_lengths_are_seeded_and_shared():
    assert output_lengths(3, 64, False) == [64, 64, 64]
    varied = output_lengths(200, 64, True, seed=1)
    assert varied == output_lengths(200, 64, True, seed=1) != output_lengths(200, 64, True, seed=2)
    assert min(varied) >= 16 and max(varied) <= 112 and len(set(varied)) > 20
    assert 56 <= statistics.mean(varied) <= 72


def test_serve_levels_interleave_modes_with_the_same_lengths(monkeypatch):
    calls = []

    async def fake_level(url, prompts, mode, concurrency, n, lengths):
        calls.append((mode, concurrency, tuple(lengths)))
        return _serve_round(mode, 100.0, 1.0)
    monkeypatch.setattr(bench_serve, "run_level", fake_level)
    args = argparse.Namespace(concurrency=[4], modes=["atv", "off"], requests_per_level=6, new_tokens=8,
                              varied_lengths=True, seed=3, rounds=3)
    records = bench_serve.run_levels("http://x", PROMPTS, args)
    assert [c[0] for c in calls] == ["atv", "off", "off", "atv", "atv", "off"]
    assert len({c[2] for c in calls}) == 1 and calls[0][2] == tuple(output_lengths(6, 8, True, 3))
    assert [r["mode"] for r in records] == ["atv", "off"] and records[0]["rounds_n"] == 3


def test_ttft_waves_pair_one_token_waves_of_every_prompt(monkeypatch):
    calls = []

    async def fake_request(client, url, prompt, mode, new_tokens):
        calls.append((mode, prompt, new_tokens))
        wave = sum(1 for c in calls if c[1] == prompt) - 1           # this prompt's wave index
        if mode == "atv" and prompt == "hi" and wave == 4:
            return {"ok": False, "status": 500}
        ttft = 1.0 + 0.1 * wave + (0.05 if mode == "atv" else 0.0)   # drift of 0.1 s per wave, atv + 50 ms
        return {"ok": True, "ttft": ttft + 0.01 * PROMPTS.index(prompt), "itl": [], "e2e": ttft, "tokens": 1}
    monkeypatch.setattr(bench_serve, "one_request", fake_request)
    waves = bench_serve.ttft_waves("http://x", PROMPTS, ["atv", "off"], 3)
    modes = [c[0] for c in calls]
    assert modes == ["atv"] * 4 + ["off"] * 8 + ["atv"] * 8 + ["off"] * 4    # rotated per pair
    assert {c[2] for c in calls} == {1} and all({c[1] for c in calls[i:i + 4]} == set(PROMPTS) for i in range(0, 24, 4))
    assert waves["waves"] == 3 and waves["concurrency"] == 4 and waves["failures"] == 1
    d = waves["atv_minus_off"]
    # pairs: (atv wave 0, off wave 1), (off wave 2, atv wave 3), (atv wave 4 without "hi", off wave 5)
    assert d["rounds"] == pytest.approx([0.05 - 0.1, 0.05 + 0.1, 0.05 - 0.1 + 0.005])
    table = bench_serve.table([], {}, {"ttft_waves": waves})
    assert "3 paired waves of 4 one-token requests" in table


# ---- the closed-batch baseline against the engine (tiny Llama, fp32) ----------------------------------
@pytest.fixture(scope="module")
def model():
    return make_model("llama")


@pytest.fixture(scope="module", params=["all", "last"])
def engine(request, model, tmp_path_factory):
    path = make_tiny_generator_dir(tmp_path_factory.mktemp("g") / "gen", position=request.param)
    generator = load_generator(path, target=model)
    assert generator.config.position == request.param
    return LLMEngine(model, make_tokenizer(), generator, EngineConfig(max_running=8, enable_prefix_caching=False))


@pytest.mark.parametrize("varied", [False, True])
def test_closed_batch_generate_equals_the_engine_token_for_token(engine, varied):
    """Same greedy tokens off and steered (the generator run by each side on the same prompts, the vectors
    added by the same hook op): exact, since a left-padded row sees masked padding only and the tiny model's
    decisions have margins far above fp32 rounding."""
    lengths = output_lengths(len(PROMPTS), 10, varied, seed=5)
    for mode in ("off", "atv"):
        served = bench.run_engine(engine, PROMPTS, mode, lengths)
        closed = bench.closed_batch(engine.model, engine.tokenizer, PROMPTS, lengths,
                                    engine.generator if mode == "atv" else None)
        assert closed["outputs"] == served["outputs"], mode
        assert [len(o) for o in closed["outputs"]] == lengths and closed["tokens"] == sum(lengths)
        assert closed["computed_tokens"] == len(PROMPTS) * max(lengths)
    off = bench.closed_batch(engine.model, engine.tokenizer, PROMPTS, lengths)["outputs"]
    assert off != closed["outputs"]                                 # the hooks did steer


def test_closed_batch_with_given_vectors_equals_the_engine_with_the_same(engine):
    with torch.no_grad():
        vectors = engine.generator(PROMPTS[::-1]).vectors * 3       # not what either side would generate
    served = bench.run_engine(engine, PROMPTS, "atv", 8, vectors=vectors)
    closed = bench.closed_batch(engine.model, engine.tokenizer, PROMPTS, 8, engine.generator, vectors=vectors)
    assert closed["outputs"] == served["outputs"]
    assert closed["outputs"] != bench.run_engine(engine, PROMPTS, "atv", 8)["outputs"]


def test_closed_batch_slots_follow_the_position_policy():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(bench.closed_batch_prefill_slots(mask, "all"), torch.tensor([[0, 1, 1], [2, 2, 2]]))
    assert torch.equal(bench.closed_batch_prefill_slots(mask, "last"), torch.tensor([[0, 0, 1], [0, 0, 2]]))
    ids, m = bench.left_pad([[5, 6], [7, 8, 9]], 0)
    assert torch.equal(ids, torch.tensor([[0, 5, 6], [7, 8, 9]])) and torch.equal(m, mask)


# ---- variants, step cost, the whole command -----------------------------------------------------------
def _args(**kw):
    base = dict(stagger_ms=1.0, no_closed_batch=False, moonshot_requests=3, new_tokens=6, varied_lengths=True,
                seed=0, prefix_caching=False, max_num_batched_tokens=None, long_prompt_tokens=None,
                long_prefill_chunk=None, kv_cache_gib=None)
    return argparse.Namespace(**{**base, **kw})


def test_every_variant_produces_the_same_per_request_lengths(engine):
    lengths = output_lengths(len(PROMPTS), 6, True, seed=0)
    variants = bench.engine_variants(_args(), engine, PROMPTS, lengths)
    assert set(variants) == {"atv", "off", "atv_staggered", "off_staggered", "closed_batch_atv", "closed_batch_off",
                             "moonshot_atv"}
    results = run_rounds(variants, 2)
    for name, runs in results.items():
        want = output_lengths(3, 6, True, seed=0) if name == "moonshot_atv" else lengths
        for run in runs:
            assert [len(o) for o in run["outputs"]] == want, name
    assert results["atv"][0]["outputs"] == results["atv_staggered"][1]["outputs"]


def test_step_cost_runs_one_decode_batch_steered_and_not_then_cleans_up(engine, monkeypatch):
    seen = []
    original = engine.runner.run

    def spy(chunks):
        seen.append((tuple(c.start for c in chunks), any(c.request.vector_slot for c in chunks)))
        return original(chunks)
    monkeypatch.setattr(engine.runner, "run", spy)
    cost = bench.step_cost(engine, PROMPTS, 3)
    runs = seen[-6:]
    assert [steered for _, steered in runs] == [True, False, False, True, True, False]
    assert len({starts for starts, _ in runs}) == 1 and len(runs[0][0]) == len(PROMPTS)
    assert cost["batch"] == len(PROMPTS) and cost["step_ms"]["steered"]["n"] == 3
    assert cost["ratio"]["rounds"] == [a / b for a, b in zip(cost["step_ms_rounds"]["steered"],
                                                            cost["step_ms_rounds"]["unsteered"])]
    assert not engine.has_work() and engine.runner.slots_used == 0 and engine.scheduler.blocks.num_used == 0


def test_bench_engine_command_writes_rounds_medians_and_ratios(tmp_path):
    model = make_tiny_model_dir(tmp_path / "target", "llama")
    generator = make_tiny_generator_dir(tmp_path / "gen")
    out = tmp_path / "engine.json"
    assert bench.cli(["--model", str(model), "--generator", str(generator), "--device", "cpu", "--dtype", "float32",
                      "--requests", "3", "--new-tokens", "3", "--rounds", "2", "--step-repetitions", "2",
                      "--naive-requests", "1", "--no-generate-batch", "--stagger-ms", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["tok_per_s_rounds"]) == {"atv", "off", "closed_batch_atv", "closed_batch_off"}
    assert all(len(v) == 2 for v in report["tok_per_s_rounds"].values())
    assert report["tok_per_s"]["atv"] == statistics.median(report["tok_per_s_rounds"]["atv"])
    assert report["ratios"]["atv_over_off"] == statistics.median(
        a / b for a, b in zip(report["tok_per_s_rounds"]["atv"], report["tok_per_s_rounds"]["off"]))
    assert report["closed_batch_outputs_equal_engine"] == {"atv": 3, "off": 3}
    assert {"naive_generate", "atv_over_naive_generate"} <= set(report["tok_per_s"]) | set(report["ratios"])
    assert report["step_cost"]["step_ms"]["steered"]["n"] == 2 and report["workload"]["rounds"] == 2
    assert report["engine_config"]["enable_prefix_caching"] is False    # rounds do not reuse earlier rounds' KV
