"""`atv bench engine`: the engine driven directly, side by side with the ways people serve today.

`--scenario uniform` (default). Same prompts and output lengths for every variant (greedy, EOS ignored, so
request i produces exactly its max_tokens: --new-tokens for all, or with --varied-lengths a seeded draw
that every variant shares). Run as --rounds rounds; each round runs every variant once, the order rotated
per round (bench_rounds.py), and every figure is the median over rounds with its spread:
- atv:               our engine, a distinct generator vector per request (generator time included)
- off:               our engine, steering off
- atv_staggered / off_staggered: the same with requests arriving --stagger-ms apart (0 = not run)
- closed_batch_atv / closed_batch_off: one transformers `generate` over the left-padded batch of the same
                     prompt ids, same model object (so same dtype), greedy, EOS not a stop; the atv variant
                     runs the generator on the prompts (inside the timing, as the engine does) and adds each
                     row's vectors with the engine's own hook op (injection.steering) under the generator's
                     position policy. Only each request's own tokens count (a closed batch computes
                     max(lengths) for every row).
- moonshot_atv:      (--moonshot-requests N) N ATV requests in an engine with max_running N.
Prefix caching is off in these engines unless --prefix-caching (uniform_engine_kwargs says why; `atv bench
prefix` measures it).
Ratios (ATV/off, ATV/closed batch, ...) are computed per round; reported as the median of the per-round
ratios (`ratios`) and, in `ratio_detail`, with their min/max and the ratio of the medians.
Once per run: the per-step cost of steering alone (`step_cost`: the same batch of decodes at fixed positions
through the engine's ModelRunner, steered and unsteered alternately, --step-repetitions each), sequential
batch-1 hooked `generate` (the research code's way of serving) and transformers' `generate_batch`.
`--scenario mixed`: short requests with and without one long prompt, each run in its own process
(bench_mixed.py). `atv bench serve` (HTTP under load) lives in bench_serve.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from atv_core.engine.build import build_engine
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.engine.request import Request, SamplingParams, SteeringSpec
from atv_core.models import DEFAULT_GENERATOR_DIR, EMBEDDED_TARGET
from atv_core.steering.injection import make_table, steering
from atv_core.steering.layers import find_decoder_layers
from atv_core.tools.bench_rounds import output_lengths, run_rounds, summarize
from atv_core.tools.tasks import workload_prompts

log = logging.getLogger("atv.bench")

ENGINE_RATIOS = {  # name -> (numerator variant, denominator variant), paired per round
    "atv_over_off": ("atv", "off"),
    "atv_staggered_over_off_staggered": ("atv_staggered", "off_staggered"),
    "atv_over_closed_batch_atv": ("atv", "closed_batch_atv"),
    "off_over_closed_batch_off": ("off", "closed_batch_off"),
    "closed_batch_atv_over_closed_batch_off": ("closed_batch_atv", "closed_batch_off"),
}


def machine_info() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "hostname": platform.node()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                                     None)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _lengths(new_tokens: int | Sequence[int], n: int) -> list[int]:
    return [new_tokens] * n if isinstance(new_tokens, int) else list(new_tokens)


# ---- the engine ---------------------------------------------------------------------------------------
def run_engine(engine: LLMEngine, prompts: list[str], mode: str, new_tokens: int | Sequence[int],
               stagger_s: float = 0.0, vectors: torch.Tensor | None = None) -> dict:
    """Drive the engine to completion; requests arrive stagger_s apart. new_tokens: one length for all or
    one per request; vectors [B, L_sel, d]: given generator vectors (Request.vector) instead of the
    engine's own generator run. Returns throughput, median TTFT and each request's token ids."""
    tok = engine.tokenizer
    requests = [Request(f"b{i}", tok(p)["input_ids"], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                        SteeringSpec(mode), p, vector=None if vectors is None else vectors[i])
                for i, (p, n) in enumerate(zip(prompts, _lengths(new_tokens, len(prompts))))]
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


def step_cost(engine: LLMEngine, prompts: list[str], repetitions: int) -> dict:
    """The cost of steering alone: admit the prompts as ATV requests, run until each has its first token,
    schedule one batch of decodes (one token per request, fixed positions) and run that same batch through
    the ModelRunner `repetitions` times steered and as many unsteered (slot 0: no hooks), alternating with
    the order rotated. The requests are aborted afterwards. Step times in milliseconds."""
    ids = [engine.tokenizer(p)["input_ids"] for p in prompts]
    params = SamplingParams(max_tokens=min(64, engine.max_model_len - max(map(len, ids))), temperature=0.0,
                            ignore_eos=True)   # none ends while the others still wait for their first token
    requests = [Request(f"step{i}", x, params, SteeringSpec("atv"), p) for i, (x, p) in enumerate(zip(ids, prompts))]
    for request in requests:
        engine.add_request(request)
    try:
        while not all(r.output_ids for r in requests):
            engine.step()
        batch = engine.scheduler.schedule()
        if batch is None or batch.phase != "decode" or len(batch.chunks) != len(requests):
            raise RuntimeError(f"expected one decode per request, got {batch and len(batch.chunks)} chunks "
                               f"({batch and batch.phase}); raise max_running / the step token budget")
        slots = {id(r): r.vector_slot for r in requests}
        times = run_rounds({"steered": lambda: _timed_step(engine, batch, slots, True),
                            "unsteered": lambda: _timed_step(engine, batch, slots, False)}, repetitions)
    finally:
        for request in requests:
            engine.abort(request.request_id)
    s = summarize(times, {"steered_over_unsteered": ("steered", "unsteered")})
    return {"batch": len(requests), "positions": [c.start for c in batch.chunks], "repetitions": repetitions,
            "step_ms": s["figures"], "ratio": s["ratios"]["steered_over_unsteered"], "step_ms_rounds": times}


def _timed_step(engine: LLMEngine, batch, slots: dict[int, int], steered: bool) -> float:
    for chunk in batch.chunks:
        chunk.request.vector_slot = slots[id(chunk.request)] if steered else 0
    try:
        _sync(engine.runner)
        start = time.perf_counter()
        engine.runner.run(batch.chunks)
        _sync(engine.runner)   # on CUDA the step's kernels, not only their launches
        return (time.perf_counter() - start) * 1000
    finally:
        for chunk in batch.chunks:   # the runner frees slots by request.vector_slot on release
            chunk.request.vector_slot = slots[id(chunk.request)]


def _sync(runner) -> None:
    """Wait for every GPU the target's layers run on (device_map may spread them)."""
    for device in {spec.device for spec in runner.layout.layers.values()} | {runner.device}:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


# ---- the closed-batch baseline ------------------------------------------------------------------------
def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids -> (input_ids [B, P], attention_mask [B, P]), each row's tokens at the right end."""
    width = max(len(ids) for ids in prompt_ids)
    batch = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompt_ids), width, dtype=torch.long)
    for b, ids in enumerate(prompt_ids):
        batch[b, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[b, width - len(ids):] = 1
    return batch, mask


def closed_batch_prefill_slots(mask: torch.Tensor, position: str) -> torch.Tensor:
    """[B, P] slot index of the left-padded prefill: row b's tokens get slot b + 1 ("all") or only its last
    prompt token does ("last", the last column under left padding); padding gets 0 (adds exactly +0)."""
    rows = torch.arange(1, mask.shape[0] + 1).view(-1, 1).expand_as(mask)
    if position == "all":
        return torch.where(mask.bool(), rows, 0)
    slots = torch.zeros_like(mask)
    slots[:, -1] = rows[:, -1]
    return slots


@contextmanager
def generate_steering(model: torch.nn.Module, vectors: torch.Tensor, mask: torch.Tensor, layers: Sequence[int],
                      position: str) -> Iterator[None]:
    """While `generate` runs, each forward of `model` steers row b by vectors[b] [L_sel, d] through
    injection.steering (the engine's op and hooks): the first forward (the prefill, [B, P]) with the prompt's
    slots under the position policy, every later one ([B, 1], the token just generated) with row b's slot,
    as the engine steers every output token under both policies."""
    table = make_table(vectors.to(model.dtype))                                        # [L_sel, B + 1, d]
    prefill = closed_batch_prefill_slots(mask, position)                               # [B, P]
    decode = torch.arange(1, mask.shape[0] + 1).view(-1, 1)                            # [B, 1]
    state = {"calls": 0, "stack": ExitStack()}

    def before(_module, _args, kwargs):
        ids = kwargs.get("input_ids")
        slots = prefill if state["calls"] == 0 else decode
        if ids is None or tuple(ids.shape) != tuple(slots.shape):
            raise ValueError(f"generate fed input_ids of shape {None if ids is None else tuple(ids.shape)}, "
                             f"the steering expects {tuple(slots.shape)}; run it without prefill chunking")
        state["calls"] += 1
        state["stack"].enter_context(steering(model, table, slots.to(table.device), layers))

    def after(_module, _args, _output):
        state["stack"].close()

    handles = [model.register_forward_pre_hook(before, with_kwargs=True), model.register_forward_hook(after)]
    try:
        yield
    finally:
        state["stack"].close()
        for handle in handles:
            handle.remove()


def closed_batch(model, tokenizer, prompts: list[str], new_tokens: int | Sequence[int], generator=None,
                 vectors: torch.Tensor | None = None) -> dict:
    """One `generate` call over the left-padded batch of the prompts' ids: greedy, max(lengths) new tokens,
    EOS not a stop (eos_token_id=None: the engine's ignore_eos; min_new_tokens would instead forbid EOS and so
    change the greedy tokens). Steered when `vectors` [B, L_sel, d] are given or a `generator` is (then its
    run on the prompts is timed too, as in the engine), with the generator's layers and position policy.
    Each request counts only its own length's tokens; `outputs` are cut to them."""
    lengths = _lengths(new_tokens, len(prompts))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids, mask = left_pad([tokenizer(p)["input_ids"] for p in prompts], pad_id)
    device = model.get_input_embeddings().weight.device
    start = time.perf_counter()
    with torch.no_grad(), ExitStack() as stack:
        if generator is not None and vectors is None:
            vectors = generator([generator.format_input(p) for p in prompts]).vectors
        if vectors is not None:
            config = generator.config if generator is not None else None
            layers = config.selected_layers if config else list(range(vectors.shape[1]))
            stack.enter_context(generate_steering(model, vectors.to(device), mask, layers,
                                                  config.position if config else "all"))
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max(lengths), do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    elapsed = time.perf_counter() - start
    outputs = [row[: n].tolist() for row, n in zip(out[:, input_ids.shape[1]:].cpu(), lengths)]
    tokens = sum(len(o) for o in outputs)
    return {"tok_per_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens,
            "computed_tokens": len(prompts) * max(lengths), "outputs": outputs}


# ---- single-run baselines -----------------------------------------------------------------------------
def naive_generate(model, tokenizer, prompts: list[str], vectors: torch.Tensor, layers,
                   new_tokens: int | Sequence[int]) -> dict:
    """Batch 1, one request after another, a forward hook per layer adding that request's vector."""
    blocks = find_decoder_layers(model)
    start, tokens = time.perf_counter(), 0
    for prompt, vector, n in zip(prompts, vectors, _lengths(new_tokens, len(prompts))):
        handles = [blocks[l].register_forward_hook(
            lambda _m, _i, out, v=vector[j]: (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v)
            for j, l in enumerate(layers)]
        try:
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
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


# ---- the run ------------------------------------------------------------------------------------------
def engine_kwargs(args, max_running: int) -> dict:
    """EngineConfig fields from the command line (unset ones keep the engine's defaults)."""
    kwargs = {"max_running": max_running, "max_num_batched_tokens": args.max_num_batched_tokens,
              "long_prompt_tokens": args.long_prompt_tokens, "long_prefill_chunk": args.long_prefill_chunk,
              "kv_cache_bytes": int(args.kv_cache_gib * 2**30) if args.kv_cache_gib else None}
    return {k: v for k, v in kwargs.items() if v is not None}


def uniform_engine_kwargs(args, max_running: int) -> dict:
    """engine_kwargs plus prefix caching, off unless --prefix-caching: the uniform workload's prompts share no
    full block within a run, so the only reuse there is of an earlier run's (or round's) identical prompts,
    which fresh traffic would not find and the closed-batch baseline does not get."""
    return {**engine_kwargs(args, max_running), "enable_prefix_caching": args.prefix_caching}


def engine_variants(args, engine: LLMEngine, prompts: list[str], lengths: list[int]) -> dict:
    """name -> a zero-argument run returning a result dict with tok_per_s and (engine runs) ttft_p50_s."""
    model, tokenizer, generator = engine.model, engine.tokenizer, engine.generator
    stagger = args.stagger_ms / 1000
    variants = {"atv": lambda: run_engine(engine, prompts, "atv", lengths),
                "off": lambda: run_engine(engine, prompts, "off", lengths)}
    if stagger > 0:
        variants["atv_staggered"] = lambda: run_engine(engine, prompts, "atv", lengths, stagger)
        variants["off_staggered"] = lambda: run_engine(engine, prompts, "off", lengths, stagger)
    if not args.no_closed_batch:
        variants["closed_batch_atv"] = lambda: closed_batch(model, tokenizer, prompts, lengths, generator)
        variants["closed_batch_off"] = lambda: closed_batch(model, tokenizer, prompts, lengths)
    if args.moonshot_requests:
        config = EngineConfig(**uniform_engine_kwargs(args, args.moonshot_requests))
        big = LLMEngine(model, tokenizer, generator, config)
        big_prompts = workload_prompts(args.moonshot_requests)
        big_lengths = output_lengths(args.moonshot_requests, args.new_tokens, args.varied_lengths, args.seed)
        variants["moonshot_atv"] = lambda: run_engine(big, big_prompts, "atv", big_lengths)
    return variants


def engine_figures(results: dict[str, list[dict]]) -> dict:
    """Per-round results {variant: [result, ...]} -> the report's figures: median tok/s per variant with its
    spread and rounds, median TTFT p50, and the ENGINE_RATIOS paired per round (`ratios`: median of the
    per-round ratios; `ratio_detail`: that with min/max and the ratio of the medians)."""
    rounds = {name: [r["tok_per_s"] for r in runs] for name, runs in results.items()}
    s = summarize(rounds, ENGINE_RATIOS)
    ttft = {name: statistics.median(r["ttft_p50_s"] for r in runs) for name, runs in results.items()
            if runs and "ttft_p50_s" in runs[0]}
    return {"tok_per_s": {name: f["median"] for name, f in s["figures"].items()},
            "tok_per_s_spread": s["figures"], "tok_per_s_rounds": rounds, "ttft_p50_s": ttft,
            "ratios": {name: r["median_of_round_ratios"] for name, r in s["ratios"].items()},
            "ratio_detail": s["ratios"]}


def bench_engine(args) -> dict:
    engine = build_engine(args.model, args.generator, device=args.device, dtype=args.dtype,
                          config=EngineConfig(**uniform_engine_kwargs(args, max(args.requests, 1))))
    if engine.generator is None:
        raise ValueError("atv bench engine compares steered with unsteered serving and needs a generator; "
                         "pass --generator DIR")
    args.new_tokens = args.new_tokens or 64
    model, tokenizer, generator = engine.model, engine.tokenizer, engine.generator
    prompts = workload_prompts(args.requests)
    lengths = output_lengths(args.requests, args.new_tokens, args.varied_lengths, args.seed)
    prompt_lens = [len(tokenizer(p)["input_ids"]) for p in prompts]
    run_engine(engine, prompts[:4], "atv", 4)  # warm-up
    if not args.no_closed_batch:
        closed_batch(model, tokenizer, prompts[:4], 4, generator)
    variants = engine_variants(args, engine, prompts, lengths)
    results = run_rounds(variants, args.rounds,
                         on_run=lambda r, name: log.info("round %d/%d: %s", r + 1, args.rounds, name))
    report = {"machine": machine_info(), "workload": _workload(args, model, prompt_lens, lengths),
              "engine_config": uniform_engine_kwargs(args, max(args.requests, 1)), **engine_figures(results)}
    report["staggered_tok_per_s"] = {m: report["tok_per_s"][f"{m}_staggered"] for m in ("atv", "off")
                                     if f"{m}_staggered" in report["tok_per_s"]}
    report["atv_outputs_differ_from_off"] = sum(a != b for a, b in zip(results["atv"][0]["outputs"],
                                                                      results["off"][0]["outputs"]))
    if not args.no_closed_batch:
        report["closed_batch_outputs_equal_engine"] = {m: sum(a == b for a, b in zip(
            results[m][0]["outputs"], results[f"closed_batch_{m}"][0]["outputs"])) for m in ("atv", "off")}
    if args.moonshot_requests:
        report["moonshot"] = {"requests": args.moonshot_requests, "max_running": args.moonshot_requests,
                              "mode": "atv", "target_tok_per_s": 400,
                              "tok_per_s": report["tok_per_s_spread"]["moonshot_atv"]}
    if args.step_repetitions:
        log.info("per-step cost of steering: %d x 2 runs of one decode batch", args.step_repetitions)
        report["step_cost"] = step_cost(engine, prompts, args.step_repetitions)
    tps, errors = single_baselines(args, engine, prompts, lengths)
    report["tok_per_s"].update(tps)
    report["ratios"].update({f"atv_over_{k}": report["tok_per_s"]["atv"] / v for k, v in tps.items()})
    report["errors"] = errors
    return report


def single_baselines(args, engine: LLMEngine, prompts: list[str], lengths: list[int]) -> tuple[dict, dict]:
    """Sequential hooked generate and generate_batch, one run each (slow; not in the rounds; their ratios
    are to the median ATV tok/s) -> ({name: tok/s}, {name: why it has no figure})."""
    model, tokenizer, generator = engine.model, engine.tokenizer, engine.generator
    tps, errors = {}, {}
    n_naive = min(args.naive_requests, len(prompts))
    if n_naive:
        log.info("sequential batch-1 hooked generate on %d requests", n_naive)
        with torch.no_grad():
            vectors = generator(prompts[:n_naive]).vectors.to(model.dtype)
        tps["naive_generate"] = naive_generate(model, tokenizer, prompts[:n_naive], vectors,
                                               generator.config.selected_layers, lengths[:n_naive])["tok_per_s"]
    if args.varied_lengths:
        errors["hf_generate_batch"] = "not run: generate_batch takes one max_new_tokens for every request"
    elif not args.no_generate_batch:
        log.info("transformers generate_batch")
        try:
            tps["hf_generate_batch"] = hf_generate_batch(model, tokenizer, prompts, args.new_tokens)["tok_per_s"]
        except Exception as exc:  # report, do not hide: the figure is then missing from the ratios
            log.exception("generate_batch failed")
            errors["hf_generate_batch"] = f"{type(exc).__name__}: {exc}"
    return tps, errors


def _workload(args, model, prompt_lens: list[int], lengths: list[int]) -> dict:
    return {"model": args.model, "generator": str(args.generator), "requests": args.requests,
            "new_tokens": args.new_tokens, "varied_lengths": args.varied_lengths, "seed": args.seed,
            "output_tokens_total": sum(lengths), "output_tokens_min": min(lengths), "output_tokens_max": max(lengths),
            "prompt_tokens_min": min(prompt_lens), "prompt_tokens_max": max(prompt_lens),
            "prompt_tokens_mean": sum(prompt_lens) / len(prompt_lens), "naive_requests": args.naive_requests,
            "stagger_ms": args.stagger_ms, "rounds": args.rounds, "statistic": "median over interleaved rounds",
            "dtype": str(model.dtype), "device": str(model.device), "sampling": "greedy, EOS ignored"}


def print_report(report: dict) -> None:
    print(f"machine: {report['machine']}")
    print(f"workload: {report['workload']}")
    spreads = report["tok_per_s_spread"]
    print(f"{'method':<24}{'tok/s median':>14}{'min-max':>18}")
    for k, v in report["tok_per_s"].items():
        s = spreads.get(k)
        rng = f"{s['min']:.1f}-{s['max']:.1f}" if s else "(one run)"
        print(f"{k:<24}{(f'{v:.1f}' if v else 'n/a'):>14}{rng:>18}")
    for k, v in report["ratios"].items():
        d = report["ratio_detail"].get(k)
        extra = (f"  [{d['min']:.3f}-{d['max']:.3f}; 95 % interval {d['interval95'][0]:.3f}-{d['interval95'][1]:.3f}; "
                 f"ratio of medians {d['ratio_of_medians']:.3f}]") if d else ""
        print(f"{k:<40}{v:>8.3f}x{extra}")
    if "step_cost" in report:
        c = report["step_cost"]
        print(f"decode step, batch {c['batch']}: steered {c['step_ms']['steered']['median']:.2f} ms, unsteered "
              f"{c['step_ms']['unsteered']['median']:.2f} ms, ratio {c['ratio']['median_of_round_ratios']:.4f} "
              f"[{c['ratio']['min']:.4f}-{c['ratio']['max']:.4f}; 95 % interval {c['ratio']['interval95'][0]:.4f}-"
              f"{c['ratio']['interval95'][1]:.4f}]")
    for k, v in report.get("errors", {}).items():
        print(f"{k}: {v}")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atv bench engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("uniform", "mixed"), default="uniform")
    parser.add_argument("--model", default=EMBEDDED_TARGET)
    parser.add_argument("--generator", default=str(DEFAULT_GENERATOR_DIR))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=32, help="uniform: concurrent requests")
    parser.add_argument("--new-tokens", type=int, help="tokens per request (default 64 uniform, 48 mixed)")
    parser.add_argument("--varied-lengths", action="store_true",
                        help="uniform: max_tokens per request drawn from [n/4, 7n/4] (seeded; same for all variants)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --varied-lengths")
    parser.add_argument("--rounds", type=int, default=5, help="uniform: interleaved rounds; figures are medians")
    parser.add_argument("--step-repetitions", type=int, default=30,
                        help="uniform: steered and unsteered runs of one decode batch for the per-step cost (0: skip)")
    parser.add_argument("--moonshot-requests", type=int, default=0,
                        help="uniform: also run this many ATV requests with max_running as many, in the rounds")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="uniform: keep the engine's prefix caching on (later rounds then reuse earlier rounds' "
                             "prompt blocks)")
    parser.add_argument("--no-closed-batch", action="store_true", help="uniform: skip the closed-batch generate")
    parser.add_argument("--no-generate-batch", action="store_true", help="uniform: skip transformers generate_batch")
    parser.add_argument("--mode", choices=("atv", "off"), default="atv", help="mixed: steering of every request")
    parser.add_argument("--short-requests", type=int, default=31, help="mixed: short requests")
    parser.add_argument("--long-tokens", type=int, default=7000, help="mixed: prompt tokens of the long request")
    parser.add_argument("--max-num-batched-tokens", type=int, help="engine: tokens per step")
    parser.add_argument("--long-prompt-tokens", type=int, help="engine: prompts longer than this are chunked")
    parser.add_argument("--long-prefill-chunk", type=int, help="engine: their tokens per step beside others")
    parser.add_argument("--kv-cache-gib", type=float, help="engine: KV cache budget")
    parser.add_argument("--naive-requests", type=int, default=8,
                        help="requests for the sequential baseline (its tok/s does not depend on the count; 0: skip)")
    parser.add_argument("--stagger-ms", type=float, default=50.0, help="uniform: staggered variants' gap (0: skip)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
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
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
