"""`atv bench engine`: the engine driven directly, side by side with the ways people serve today.

`--scenario uniform` (default). Measured in one run on one machine, same prompts and token counts
(greedy, EOS ignored, so every request produces exactly --new-tokens tokens):
- atv:              our engine, a distinct generator vector per request
- off:              our engine, steering off
- naive_generate:   sequential batch-1 `model.generate` with per-layer hooks adding the vector at every
                    position (the research code's way of serving)
- hf_generate_batch: transformers' own continuous batching (`generate_batch`), unsteered
plus a staggered-arrival variant of atv/off (requests arrive --stagger-ms apart). Each variant's rounds
are kept (`tok_per_s_rounds`); `tok_per_s` is the best round.
`--scenario mixed`: short requests with and without one long prompt, each run in its own process
(bench_mixed.py). `atv bench serve` (HTTP under load) lives in bench_serve.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from atv_core.engine.build import build_engine
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.steering.layers import find_decoder_layers
from atv_core.models import DEFAULT_GENERATOR_DIR, EMBEDDED_TARGET
from atv_core.engine.request import Request, SamplingParams, SteeringSpec
from atv_core.tools.tasks import workload_prompts

log = logging.getLogger("atv.bench")


def machine_info() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_engine(engine: LLMEngine, prompts: list[str], mode: str, new_tokens: int, stagger_s: float = 0.0) -> dict:
    """Drive the engine to completion; requests arrive stagger_s apart. Returns throughput and latencies."""
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    requests = [Request(f"b{i}", tok(p)["input_ids"], params, SteeringSpec(mode), p) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    arrivals = [start + i * stagger_s for i in range(len(requests))]
    pending = list(zip(arrivals, requests))
    while pending or engine.has_work():
        now = time.perf_counter()
        while pending and pending[0][0] <= now:
            engine.add_request(pending.pop(0)[1])
        if engine.has_work():
            engine.step()
        else:
            time.sleep(max(0.0, pending[0][0] - now))
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.output_ids) for r in requests)
    ttft = sorted(r.first_token_time - r.arrival_time for r in requests)
    return {"tok_per_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens,
            "ttft_p50_s": ttft[len(ttft) // 2], "outputs": [r.output_ids for r in requests]}


def naive_generate(model, tokenizer, prompts: list[str], vectors: torch.Tensor, layers, new_tokens: int) -> dict:
    """Batch 1, one request after another, a forward hook per layer adding that request's vector."""
    blocks = find_decoder_layers(model)
    start, tokens = time.perf_counter(), 0
    for prompt, vector in zip(prompts, vectors):
        handles = [blocks[l].register_forward_hook(
            lambda _m, _i, out, v=vector[j]: (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v)
            for j, l in enumerate(layers)]
        try:
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
        finally:
            for h in handles:
                h.remove()
    elapsed = time.perf_counter() - start
    return {"tok_per_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens}


def hf_generate_batch(model, tokenizer, prompts: list[str], new_tokens: int) -> dict:
    from transformers import GenerationConfig

    inputs = [tokenizer(p)["input_ids"] for p in prompts]
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    previous = model.config._attn_implementation
    start = time.perf_counter()
    try:
        results = model.generate_batch(inputs=inputs, generation_config=config, progress_bar=False)
    finally:
        model.config._attn_implementation = previous
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.generated_tokens) for r in results.values())
    return {"tok_per_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens}


def engine_kwargs(args, max_running: int) -> dict:
    """EngineConfig fields from the command line (unset ones keep the engine's defaults)."""
    kwargs = {"max_running": max_running, "max_num_batched_tokens": args.max_num_batched_tokens,
              "long_prompt_tokens": args.long_prompt_tokens, "long_prefill_chunk": args.long_prefill_chunk,
              "kv_cache_bytes": int(args.kv_cache_gib * 2**30) if args.kv_cache_gib else None}
    return {k: v for k, v in kwargs.items() if v is not None}


def bench_engine(args) -> dict:
    engine = build_engine(args.model, args.generator, device=args.device, dtype=args.dtype,
                          config=EngineConfig(**engine_kwargs(args, max(args.requests, 1))))
    args.new_tokens = args.new_tokens or 64
    model, tokenizer, generator = engine.model, engine.tokenizer, engine.generator
    prompts = workload_prompts(args.requests)
    prompt_lens = [len(tokenizer(p)["input_ids"]) for p in prompts]
    run_engine(engine, prompts[:4], "atv", 4)  # warm-up
    results = {}
    stagger = args.stagger_ms / 1000
    runs = {"atv": ("atv", 0.0), "off": ("off", 0.0), "atv_staggered": ("atv", stagger),
            "off_staggered": ("off", stagger)}
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):  # alternate the variants; keep each one's best run (least disturbed)
        for name, (mode, gap) in runs.items():
            log.info("engine %s (repeat %d/%d)", name, repeat + 1, args.repeats)
            result = run_engine(engine, prompts, mode, args.new_tokens, gap)
            rounds[name].append(result["tok_per_s"])
            if name not in results or result["tok_per_s"] > results[name]["tok_per_s"]:
                results[name] = result
    with torch.no_grad():
        vectors = generator(prompts).vectors.to(model.dtype)
    n_naive = min(args.naive_requests, len(prompts))
    log.info("sequential batch-1 hooked generate on %d requests", n_naive)
    results["naive_generate"] = naive_generate(model, tokenizer, prompts[:n_naive], vectors,
                                               generator.config.selected_layers, args.new_tokens)
    log.info("transformers generate_batch")
    try:
        results["hf_generate_batch"] = hf_generate_batch(model, tokenizer, prompts, args.new_tokens)
    except Exception as exc:  # report, do not hide: the figure is then missing from the ratios
        log.exception("generate_batch failed")
        results["hf_generate_batch"] = {"tok_per_s": None, "error": f"{type(exc).__name__}: {exc}"}
    tps = {k: v["tok_per_s"] for k, v in results.items()}
    ratios = {
        "atv_over_off": tps["atv"] / tps["off"],
        "atv_over_naive_generate": tps["atv"] / tps["naive_generate"],
        "atv_over_hf_generate_batch": tps["atv"] / tps["hf_generate_batch"] if tps["hf_generate_batch"] else None,
        "atv_staggered_over_off_staggered": tps["atv_staggered"] / tps["off_staggered"],
    }
    same = sum(a == b for a, b in zip(results["atv"]["outputs"], results["off"]["outputs"]))
    return {
        "machine": machine_info(),
        "workload": {"model": args.model, "generator": str(args.generator), "requests": args.requests,
                     "new_tokens": args.new_tokens, "prompt_tokens_min": min(prompt_lens),
                     "prompt_tokens_max": max(prompt_lens), "prompt_tokens_mean": sum(prompt_lens) / len(prompt_lens),
                     "naive_requests": n_naive, "stagger_ms": args.stagger_ms, "repeats": args.repeats, "dtype": str(model.dtype),
                     "device": str(model.device), "sampling": "greedy, EOS ignored"},
        "engine_config": engine_kwargs(args, max(args.requests, 1)),
        "tok_per_s": {k: tps[k] for k in ("atv", "off", "naive_generate", "hf_generate_batch")},
        "tok_per_s_rounds": rounds,
        "staggered_tok_per_s": {"atv": tps["atv_staggered"], "off": tps["off_staggered"]},
        "ttft_p50_s": {k: results[k]["ttft_p50_s"] for k in ("atv", "off", "atv_staggered", "off_staggered")},
        "ratios": ratios,
        "atv_outputs_differ_from_off": len(prompts) - same,
        "errors": {k: v["error"] for k, v in results.items() if "error" in v},
    }


def print_report(report: dict) -> None:
    print(f"machine: {report['machine']}")
    print(f"workload: {report['workload']}")
    print(f"{'method':<22}{'tok/s':>10}")
    for k, v in report["tok_per_s"].items():
        print(f"{k:<22}{(f'{v:.1f}' if v else 'n/a'):>10}")
    for k, v in report["staggered_tok_per_s"].items():
        print(f"{k + ' (staggered)':<22}{v:>10.1f}")
    for k, v in report["ratios"].items():
        print(f"{k:<36}{(f'{v:.2f}x' if v else 'n/a'):>10}")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atv bench engine", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=("uniform", "mixed"), default="uniform")
    parser.add_argument("--model", default=EMBEDDED_TARGET)
    parser.add_argument("--generator", default=str(DEFAULT_GENERATOR_DIR))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=32, help="uniform: concurrent requests")
    parser.add_argument("--new-tokens", type=int, help="tokens per request (default 64 uniform, 48 mixed)")
    parser.add_argument("--mode", choices=("atv", "off"), default="atv", help="mixed: steering of every request")
    parser.add_argument("--short-requests", type=int, default=31, help="mixed: short requests")
    parser.add_argument("--long-tokens", type=int, default=7000, help="mixed: prompt tokens of the long request")
    parser.add_argument("--max-num-batched-tokens", type=int, help="engine: tokens per step")
    parser.add_argument("--long-prompt-tokens", type=int, help="engine: prompts longer than this are chunked")
    parser.add_argument("--long-prefill-chunk", type=int, help="engine: their tokens per step beside others")
    parser.add_argument("--kv-cache-gib", type=float, help="engine: KV cache budget")
    parser.add_argument("--naive-requests", type=int, default=8,
                        help="requests for the sequential baseline (its tok/s does not depend on the count)")
    parser.add_argument("--stagger-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of the engine variants; best kept")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.scenario == "mixed":
        from atv_core.tools.bench_mixed import print_mixed, run_mixed

        report = {"machine": machine_info(), "scenario": "mixed", **run_mixed(args, engine_kwargs(
            args, args.short_requests + 1))}
        print_mixed(report)
    else:
        report = bench_engine(args)
        print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
