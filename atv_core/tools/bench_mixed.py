"""`atv bench engine --scenario mixed`: does one long prompt sink the short requests beside it?

Three runs of the engine, each in a fresh process (peak RSS is per process), same engine settings:
- short: --short-requests short prompts (the task suite's), all at once, --new-tokens each;
- mixed: the same short requests plus one prompt of --long-tokens tokens, all at once (the long one first);
- long:  the long prompt alone (its TTFT is its prefill time alone, generator included).
Each process loads the target and generator, warms up, notes its peak RSS so far (loading), resets the
counter (Linux /proc/self/clear_refs) and runs. Per token the wall-clock time of its RequestOutput is kept.

Reported, with the issue's acceptance bounds: peak RSS (mixed / short <= 1.3, increase <= 1.5 x the long
request's KV bytes + 256 MiB) twice: for the whole process (loading included, as a server's peak RSS is
read) and for the run alone (model resident, loading peaks excluded: the stricter figure); the short
requests' inter-token gaps pooled (median ratio <= 1.3, p99 ratio <= 2); the long request's TTFT <= the
short run's wall time + 1.5 x its TTFT alone; failed requests = 0.
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import resource
import statistics
import time

log = logging.getLogger("atv.bench")
MIB = 2**20


def run_mixed(args, engine_kwargs: dict) -> dict:
    runs = {}
    for part in ("short", "mixed", "long"):
        log.info("scenario mixed: %s run in a fresh process", part)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs[part] = pool.submit(run_part, part, _settings(args), engine_kwargs).result()
    return {"runs": runs, "acceptance": acceptance(runs)}


def _settings(args) -> dict:
    return {"model": args.model, "generator": args.generator, "device": args.device, "dtype": args.dtype,
            "mode": args.mode, "short_requests": args.short_requests, "long_tokens": args.long_tokens,
            "new_tokens": args.new_tokens or 48}


def run_part(part: str, s: dict, engine_kwargs: dict) -> dict:
    """One run in this (fresh) process: 'short', 'mixed' or 'long'."""
    from atv_core.engine.build import build_engine
    from atv_core.engine.llm_engine import EngineConfig
    from atv_core.tools.tasks import workload_prompts

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    engine = build_engine(s["model"], s["generator"], device=s["device"], dtype=s["dtype"],
                          config=EngineConfig(**engine_kwargs))
    tok = engine.tokenizer
    shorts = [tok(p)["input_ids"] for p in workload_prompts(s["short_requests"])]
    long_ids = _long_prompt(tok, s["long_tokens"])
    _drive(engine, [shorts[0]], s["mode"], 2)                                # warm-up
    load_peak = _peak_rss()
    reset = _reset_peak_rss()
    prompts = {"short": shorts, "mixed": [long_ids] + shorts, "long": [long_ids]}[part]
    result = _drive(engine, prompts, s["mode"], s["new_tokens"])
    run_peak = _peak_rss()
    result.update(part=part, peak_rss_bytes=max(load_peak, run_peak), run_peak_rss_bytes=run_peak if reset else None,
                  load_peak_rss_bytes=load_peak, long_tokens=len(long_ids),
                  kv_bytes_per_token=engine.runner.layout.bytes_per_token, preemptions=engine.scheduler.num_preemptions,
                  kv_pool_bytes=engine.runner.cache.allocated_bytes, kv_touched_bytes=engine.runner.cache.touched_bytes,
                  step_budget=engine.scheduler.config.max_num_batched_tokens,
                  long_prefill_chunk=engine.scheduler.config.long_prefill_chunk)
    for i, request in enumerate(result["requests"]):
        request["long"] = part != "short" and i == 0
    return result


def _long_prompt(tok, n: int) -> list[int]:
    """Exactly n tokens of task-suite text, prompts end to end."""
    from atv_core.tools.tasks import workload_prompts

    ids: list[int] = []
    count = 64
    while len(ids) < n:
        ids = tok("\n".join(workload_prompts(count, seed=1)))["input_ids"]
        count *= 2
    return ids[:n]


def _drive(engine, prompts: list[list[int]], mode: str, new_tokens: int) -> dict:
    """Add every prompt at once, step to the end; per request: TTFT, token times, finish reason."""
    from atv_core.engine.request import Request, SamplingParams, SteeringSpec

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    times: dict[str, list[float]] = {}
    requests = []
    for i, ids in enumerate(prompts):
        rid = f"m{i}"
        times[rid] = []
        requests.append(Request(rid, ids, params, SteeringSpec(mode), engine.tokenizer.decode(ids[:512]),
                                on_output=lambda out, t=times[rid]: t.append(time.monotonic())))
    start = time.monotonic()
    for request in requests:
        request.arrival_time = start
        engine.add_request(request)
    while engine.has_work():
        engine.step()
    wall = time.monotonic() - start
    return {"wall_s": wall, "requests": [
        {"prompt_tokens": r.num_prompt_tokens, "tokens": len(r.output_ids), "finish_reason": r.finish_reason,
         "ttft_s": times[r.request_id][0] - start if times[r.request_id] else None,
         "gaps_s": [b - a for a, b in zip(times[r.request_id], times[r.request_id][1:])]} for r in requests]}


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                      # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        log.warning("cannot reset the peak RSS counter: peaks include model loading")
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def acceptance(runs: dict) -> dict:
    short, mixed, alone = runs["short"], runs["mixed"], runs["long"]
    long_tokens = mixed["long_tokens"]
    shorts_mixed = [r for r in mixed["requests"] if not r["long"]]
    long_mixed = next(r for r in mixed["requests"] if r["long"])
    gaps_short = [g for r in short["requests"] for g in r["gaps_s"]]
    gaps_mixed = [g for r in shorts_mixed for g in r["gaps_s"]]
    kv_bytes = long_tokens * mixed["kv_bytes_per_token"]
    ttft_bound = short["wall_s"] + 1.5 * alone["requests"][0]["ttft_s"]
    failures = sum(r["finish_reason"] not in ("length", "stop") for run in runs.values() for r in run["requests"])
    figures = {
        "long_kv_mib": kv_bytes / MIB,
        "rss_increase_bound_mib": (1.5 * kv_bytes + 256 * MIB) / MIB,
        **_rss_figures(short, mixed, "peak_rss_bytes", "process"),
        **(_rss_figures(short, mixed, "run_peak_rss_bytes", "run") if short["run_peak_rss_bytes"] else {}),
        "itl_median_s": {"short": statistics.median(gaps_short), "mixed": statistics.median(gaps_mixed)},
        "itl_p99_s": {"short": _pct(gaps_short, 0.99), "mixed": _pct(gaps_mixed, 0.99)},
        "long_ttft_s": long_mixed["ttft_s"], "long_ttft_alone_s": alone["requests"][0]["ttft_s"],
        "short_wall_s": short["wall_s"], "long_ttft_bound_s": ttft_bound,
        "failures": failures,
    }
    figures["itl_median_ratio"] = figures["itl_median_s"]["mixed"] / figures["itl_median_s"]["short"]
    figures["itl_p99_ratio"] = figures["itl_p99_s"]["mixed"] / figures["itl_p99_s"]["short"]
    rss_checks = {}
    for kind in ("process", "run"):
        if f"{kind}_peak_rss_ratio" in figures:
            rss_checks[f"{kind}_peak_rss_ratio<=1.3"] = figures[f"{kind}_peak_rss_ratio"] <= 1.3
            rss_checks[f"{kind}_rss_increase<=1.5kv+256MiB"] = \
                figures[f"{kind}_rss_increase_mib"] <= figures["rss_increase_bound_mib"]
    figures["pass"] = {
        **rss_checks,
        "itl_median_ratio<=1.3": figures["itl_median_ratio"] <= 1.3,
        "itl_p99_ratio<=2": figures["itl_p99_ratio"] <= 2.0,
        "long_ttft<=short_wall+1.5*alone": long_mixed["ttft_s"] <= ttft_bound,
        "no_failures": failures == 0,
    }
    return figures


def _rss_figures(short: dict, mixed: dict, key: str, kind: str) -> dict:
    return {f"{kind}_peak_rss_mib": {"short": short[key] / MIB, "mixed": mixed[key] / MIB},
            f"{kind}_peak_rss_ratio": mixed[key] / short[key],
            f"{kind}_rss_increase_mib": (mixed[key] - short[key]) / MIB}


def print_mixed(report: dict) -> None:
    figures = report["acceptance"]
    for key, value in figures.items():
        if key != "pass":
            print(f"{key:<28}{value}")
    for key, ok in figures["pass"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {key}")
