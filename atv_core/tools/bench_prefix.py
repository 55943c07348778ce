"""`atv bench prefix`: time to first token of a burst of requests sharing one long system prompt, with prefix
caching on and off.

Every round builds two fresh engines around the same loaded target (cold caches), one with
`enable_prefix_caching` and one without, and sends each the same burst at once: --requests prompts made of
one --system-tokens token system prompt followed by a distinct short query (greedy, EOS ignored,
--new-tokens tokens each). The two variants alternate within each round (which goes first alternates
between rounds). Reported per variant: the median over rounds of the burst's TTFT p50 / p90 / mean and
wall time, every round's figures, the prefix cache's hit and queried tokens, and the machine. The
greedy outputs of the two variants must be equal (checked, reported as `outputs_equal`).
Steering: --mode off (default; reuse applies), or atv (the generator's vector per request: under
position policy `all` distinct vectors share nothing, under `last` everything before the last prompt
token). Timings are for a quiet machine; this module does not judge them.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

from atv_core.engine.build import build_engine
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.engine.request import Request, SamplingParams, SteeringSpec
from atv_core.models import DEFAULT_GENERATOR_DIR, EMBEDDED_TARGET
from atv_core.tools.bench import machine_info
from atv_core.tools.tasks import workload_prompts

SYSTEM_TEXT = ("You are a careful assistant for a support team. Answer in plain words, cite the policy section "
               "you rely on, never invent order numbers, and say when you do not know. ")


def system_ids(tokenizer, n: int) -> list[int]:
    """The first n token ids of a long, repeated system prompt."""
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer(SYSTEM_TEXT * 8, add_special_tokens=False)["input_ids"]
    return ids[:n]


def burst(engine: LLMEngine, prefix: list[int], queries: list[str], mode: str, new_tokens: int) -> dict:
    """Send every request at once, step to the end -> TTFT figures, wall time, outputs, cache counts."""
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    requests = [Request(f"p{i}", prefix + tok(q, add_special_tokens=False)["input_ids"], params, SteeringSpec(mode), q)
                for i, q in enumerate(queries)]
    start = time.perf_counter()
    for r in requests:
        engine.add_request(r)
    while engine.has_work():
        engine.step()
    wall = time.perf_counter() - start
    ttft = sorted(r.first_token_time - r.arrival_time for r in requests)
    stats = engine.stats()
    return {"ttft_p50_s": ttft[len(ttft) // 2], "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
            "ttft_mean_s": statistics.fmean(ttft), "wall_s": wall, "prompt_tokens": sum(r.num_prompt_tokens
                                                                                        for r in requests),
            "prefix_cache_hits": stats.prefix_cache_hits, "prefix_cache_queries": stats.prefix_cache_queries,
            "outputs": [r.output_ids for r in requests]}


def bench_prefix(args) -> dict:
    config = EngineConfig(max_running=args.requests, enable_prefix_caching=True)
    loaded = build_engine(args.model, args.generator, device=args.device, dtype=args.dtype, config=config)
    if args.mode == "atv" and loaded.generator is None:
        raise ValueError("--mode atv needs a generator; pass --generator DIR or use --mode off")
    engines = {name: (lambda on=on: LLMEngine(loaded.model, loaded.tokenizer, loaded.generator,
                                              replace(config, enable_prefix_caching=on)))
               for name, on in (("reuse", True), ("no_reuse", False))}
    prefix = system_ids(loaded.tokenizer, args.system_tokens)
    queries = workload_prompts(args.requests)
    burst(engines["reuse"](), prefix[:32], queries[:2], args.mode, 2)            # warm-up
    rounds: dict[str, list[dict]] = {name: [] for name in engines}
    for i in range(args.rounds):
        for name in (list(engines) if i % 2 == 0 else list(engines)[::-1]):
            rounds[name].append(burst(engines[name](), prefix, queries, args.mode, args.new_tokens))
            logging.getLogger("atv.bench").info("round %d %s: ttft p50 %.3f s", i, name,
                                                rounds[name][-1]["ttft_p50_s"])
    policy = loaded.generator.config.position if loaded.generator is not None else None
    return {"machine": machine_info(), "scenario": "prefix", "model": args.model, "dtype": str(loaded.model.dtype),
            "mode": args.mode, "position_policy": policy, "requests": args.requests,
            "system_tokens": args.system_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "outputs_equal": all(a["outputs"] == b["outputs"] for a, b in zip(rounds["reuse"], rounds["no_reuse"])),
            **{name: summarize(runs) for name, runs in rounds.items()}}


def summarize(runs: list[dict]) -> dict:
    keys = ("ttft_p50_s", "ttft_p90_s", "ttft_mean_s", "wall_s")
    last = runs[-1]
    return {**{k: statistics.median(r[k] for r in runs) for k in keys},
            "per_round": [{k: r[k] for k in keys} for r in runs],
            "prefix_cache_hits": last["prefix_cache_hits"], "prefix_cache_queries": last["prefix_cache_queries"]}


def print_report(report: dict) -> None:
    print(f"machine: {report['machine']}")
    print(f"{report['requests']} requests, {report['system_tokens']}-token shared system prompt, "
          f"{report['new_tokens']} new tokens, steering {report['mode']} (policy {report['position_policy']}), "
          f"{report['dtype']}, median of {report['rounds']} rounds")
    for name in ("reuse", "no_reuse"):
        r = report[name]
        print(f"{name:<10} ttft p50 {r['ttft_p50_s']:.3f} s  p90 {r['ttft_p90_s']:.3f} s  mean {r['ttft_mean_s']:.3f} s"
              f"  wall {r['wall_s']:.2f} s  cache hits {r['prefix_cache_hits']}/{r['prefix_cache_queries']} tokens")
    print(f"outputs equal: {report['outputs_equal']}")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atv bench prefix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED_TARGET)
    parser.add_argument("--generator", default=str(DEFAULT_GENERATOR_DIR))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--mode", choices=("off", "atv"), default="off")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both variants, alternated; medians kept")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = bench_prefix(args)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
