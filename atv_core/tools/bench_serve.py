"""`atv bench serve`: the HTTP server under streaming load, against the alternatives, in one run.

An async httpx load generator sends streaming /v1/completions at each concurrency level (closed loop:
`concurrency` workers, each sending its next request when the last finished) with prompts from the task
suite and a fixed completion length (`ignore_eos`; with --varied-lengths request i of a level asks for
a seeded length, the same for every mode and round), for ATV per-request vectors and steering off.
Each level runs --rounds rounds, every mode once per round in an order rotated per round (bench_rounds.py).
Per level and mode (`records`): TTFT, inter-token latency and end-to-end latency (p50/p95/p99), request and
output-token throughput as medians over the rounds (each round's figures kept in `rounds`, the spread of
tok/s and TTFT p50 beside them), failures summed. `targets`: HTTP ATV/off per round (median of the per-round
ratios) and, at --ttft-concurrency, TTFT p50(atv) - TTFT p50(off) per round (median, and as a fraction of
TTFT(off)). Then, unless --no-baselines, on the same prompts and token counts, in this process, one run
each: the engine driven directly, sequential batch-1 hooked `generate`, and transformers' `generate_batch`.
With no --url it starts the embedded default server itself (prefix caching off unless --prefix-caching: the
prompts of a level share no block, so the only reuse would be of an earlier round's identical prompts) and
stops it afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from atv_core.tools.bench_rounds import difference_summary, output_lengths, ratio_summary, run_rounds, spread

log = logging.getLogger("atv.bench")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))]  # noqa: E731
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, mode: str, new_tokens: int) -> dict:
    """One streaming completion -> its TTFT, inter-token gaps, end-to-end time and completion tokens."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}, "atv": {"mode": mode}}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"ok": False, "status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    if not stamps:
        return {"ok": False, "status": 200}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ok": True, "ttft": stamps[0] - start, "itl": gaps, "e2e": end - start, "tokens": tokens}


async def run_level(url: str, prompts: list[str], mode: str, concurrency: int, n_requests: int,
                    new_tokens: int | list[int]) -> dict:
    """n_requests through `concurrency` closed-loop workers; request i sends prompts[i] (cyclically) and asks
    for new_tokens (or new_tokens[i]) tokens."""
    lengths = [new_tokens] * n_requests if isinstance(new_tokens, int) else new_tokens
    queue = list(range(n_requests))
    results = []

    async def worker(client):
        while queue:
            i = queue.pop(0)
            try:
                results.append(await one_request(client, url, prompts[i % len(prompts)], mode, lengths[i]))
            except httpx.HTTPError as exc:
                results.append({"ok": False, "status": type(exc).__name__})

    limits = httpx.Limits(max_connections=concurrency + 4)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    return {"mode": mode, "concurrency": concurrency, "requests": n_requests,
            "ttft_s": percentiles([r["ttft"] for r in ok]), "itl_s": percentiles([g for r in ok for g in r["itl"]]),
            "e2e_s": percentiles([r["e2e"] for r in ok]), "req_per_s": len(ok) / elapsed,
            "tok_per_s": sum(r["tokens"] for r in ok) / elapsed, "failures": len(results) - len(ok),
            "seconds": elapsed}


async def one_wave(url: str, prompts: list[str], mode: str) -> dict:
    """Every prompt sent at once, each asking for one token -> the wave's median TTFT and its failures."""
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        results = await asyncio.gather(*(one_request(client, url, p, mode, 1) for p in prompts),
                                       return_exceptions=True)
    ttfts = [r["ttft"] for r in results if isinstance(r, dict) and r["ok"]]
    return {"ttft_p50": statistics.median(ttfts) if ttfts else None, "failures": len(prompts) - len(ttfts)}


def ttft_waves(url: str, prompts: list[str], modes: list[str], waves: int) -> dict:
    """TTFT(atv) - TTFT(off) from many short paired waves: per wave, `len(prompts)` requests arrive at once
    and ask for one token, so a wave's TTFT is its admission and prefill (with the generator's run for atv),
    which is what the first tokens of a closed-loop level's waves wait for. The modes alternate wave by wave
    (order rotated per pair), so the VM's drift, slow next to a wave of about a second, cancels in each pair's
    difference; the median over many pairs then resolves a few percent where a level's rounds cannot."""
    runs = run_rounds({mode: lambda mode=mode: asyncio.run(one_wave(url, prompts, mode)) for mode in modes}, waves)
    out = {"concurrency": len(prompts), "waves": waves,
           "failures": sum(w["failures"] for mode in modes for w in runs[mode]),
           "ttft_p50_s": {mode: spread([w["ttft_p50"] for w in runs[mode] if w["ttft_p50"] is not None])
                          for mode in modes}}
    if set(modes) >= {"atv", "off"}:
        pairs = [(a["ttft_p50"], o["ttft_p50"]) for a, o in zip(runs["atv"], runs["off"])
                 if a["ttft_p50"] is not None and o["ttft_p50"] is not None]
        out["atv_minus_off"] = difference_summary([a for a, _ in pairs], [o for _, o in pairs])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str], max_running: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "atv_core.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-running", str(max_running), *extra]
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"atv-bench-server-{port}.log"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_path.open("w"), text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("server did not become ready in 300 s")


def run_levels(url: str, prompts: list[str], args) -> list[dict]:
    """Every concurrency level, --rounds rounds of every mode (order rotated per round) -> one record per
    (level, mode) of medians over the rounds (level_record)."""
    records = []
    for concurrency in args.concurrency:
        n = args.requests_per_level or max(4, 2 * concurrency)
        lengths = output_lengths(n, args.new_tokens, args.varied_lengths, args.seed)
        runs = run_rounds({mode: lambda mode=mode: asyncio.run(run_level(url, prompts, mode, concurrency, n, lengths))
                           for mode in args.modes}, args.rounds)
        for mode in args.modes:
            record = level_record(runs[mode])
            log.info("%s c=%d: %.1f tok/s, ttft p50 %.3fs (medians of %d rounds), failures %d", mode, concurrency,
                     record["tok_per_s"], record["ttft_s"]["p50"] or -1, args.rounds, record["failures"])
            records.append(record)
    return records


def level_record(rounds: list[dict]) -> dict:
    """One level and mode's per-round records -> one record of the same shape (what `plot` and `table`
    read) holding the medians over the rounds, failures summed, plus the spreads of tok/s and TTFT p50 and
    the rounds themselves."""
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None
    first = rounds[0]
    out = {"mode": first["mode"], "concurrency": first["concurrency"], "requests": first["requests"],
           "rounds_n": len(rounds), "statistic": "median over rounds"}
    for key in ("ttft_s", "itl_s", "e2e_s"):
        out[key] = {q: med([r[key][q] for r in rounds]) for q in ("p50", "p95", "p99")}
    for key in ("req_per_s", "tok_per_s", "seconds"):
        out[key] = med([r[key] for r in rounds])
    out["failures"] = sum(r["failures"] for r in rounds)
    out["tok_per_s_spread"] = spread([r["tok_per_s"] for r in rounds])
    ttfts = [r["ttft_s"]["p50"] for r in rounds if r["ttft_s"]["p50"] is not None]
    out["ttft_p50_spread"] = spread(ttfts) if ttfts else None
    out["rounds"] = rounds
    return out


def baselines(args, prompts: list[str]) -> dict:
    """Engine direct, sequential hooked generate and generate_batch, on the same prompts and lengths, one
    run each (not in rounds)."""
    import torch

    from atv_core.engine.build import build_engine
    from atv_core.engine.llm_engine import EngineConfig
    from atv_core.tools.bench import hf_generate_batch, naive_generate, run_engine

    engine = build_engine(args.model, args.generator, device=args.device, dtype=args.dtype,
                          config=EngineConfig(max_running=args.max_running,
                                              enable_prefix_caching=args.prefix_caching))
    model, tokenizer, generator = engine.model, engine.tokenizer, engine.generator
    n = args.baseline_concurrency
    batch = prompts[:n]
    lengths = output_lengths(n, args.new_tokens, args.varied_lengths, args.seed)
    run_engine(engine, batch[:4], "atv", 4)
    out = {"concurrency": n, "engine_atv": run_engine(engine, batch, "atv", lengths)["tok_per_s"],
           "engine_off": run_engine(engine, batch, "off", lengths)["tok_per_s"]}
    with torch.no_grad():
        vectors = generator(batch).vectors.to(model.dtype)
    k = min(args.naive_requests, n)
    if k:
        out["naive_generate"] = naive_generate(model, tokenizer, batch[:k], vectors, generator.config.selected_layers,
                                               lengths[:k])["tok_per_s"]
    if args.varied_lengths:
        out["hf_generate_batch"] = None
        out["hf_generate_batch_error"] = "not run: generate_batch takes one max_new_tokens for every request"
        return out
    try:
        out["hf_generate_batch"] = hf_generate_batch(model, tokenizer, batch, args.new_tokens)["tok_per_s"]
    except Exception as exc:
        log.exception("generate_batch failed")
        out["hf_generate_batch"], out["hf_generate_batch_error"] = None, str(exc)
    return out


def plot(records: list[dict], path: Path) -> None:
    """Four panels against concurrency, one colour per mode: throughput, TTFT, ITL, E2E (p50 solid, p95 dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    colours = {"atv": "tab:blue", "off": "tab:orange"}
    for mode in sorted({r["mode"] for r in records}):
        rs = [r for r in records if r["mode"] == mode]
        c, colour = [r["concurrency"] for r in rs], colours.get(mode)
        axes[0].plot(c, [r["tok_per_s"] for r in rs], marker="o", color=colour, label=mode)
        for ax, key in zip(axes[1:], ("ttft_s", "itl_s", "e2e_s")):
            ax.plot(c, [r[key]["p50"] for r in rs], marker="o", color=colour, label=f"{mode} p50")
            ax.plot(c, [r[key]["p95"] for r in rs], marker="x", ls="--", color=colour, label=f"{mode} p95")
    titles = ("output tokens/s", "time to first token (s)", "inter-token latency (s)", "end-to-end latency (s)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cli(argv: list[str]) -> int:
    from atv_core.models import DEFAULT_GENERATOR_DIR, EMBEDDED_TARGET
    from atv_core.tools.bench import machine_info
    from atv_core.tools.tasks import workload_prompts

    parser = argparse.ArgumentParser(prog="atv bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server; default: start the embedded default here")
    parser.add_argument("--model", default=EMBEDDED_TARGET)
    parser.add_argument("--generator", default=str(DEFAULT_GENERATOR_DIR))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="the started server's and the baselines' dtype")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--modes", nargs="+", default=["atv", "off"], choices=["atv", "off"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--varied-lengths", action="store_true",
                        help="request i of a level asks for a seeded length in [n/4, 7n/4], the same for every mode")
    parser.add_argument("--seed", type=int, default=0, help="seed of --varied-lengths")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per level, modes interleaved; medians reported")
    parser.add_argument("--ttft-concurrency", type=int, default=32,
                        help="level of the ATV/off and TTFT(atv) - TTFT(off) targets (default 32, else the largest)")
    parser.add_argument("--ttft-waves", type=int, default=0,
                        help="then this many paired waves of --ttft-concurrency one-token requests sent at once, "
                             "atv and off alternated: TTFT(atv) - TTFT(off) with little drift (0: skip; the same prompts every "
                             "wave, so a --url server should have prefix caching off)")
    parser.add_argument("--requests-per-level", type=int, default=0, help="default: max(4, 2 x concurrency)")
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--baseline-concurrency", type=int, default=32)
    parser.add_argument("--naive-requests", type=int, default=8, help="0: skip the sequential baseline")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="the started server and the baseline engine keep prefix caching on (later rounds then "
                             "reuse earlier rounds' identical prompts)")
    parser.add_argument("--json", default="bench/serve.json")
    parser.add_argument("--plot", default="bench/serve.png")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.ttft_waves < 0:
        parser.error("--ttft-waves must be 0 (skip) or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    prompts = workload_prompts(max(max(args.concurrency), args.baseline_concurrency) * 2)
    proc = None
    url = args.url
    if url is None:
        caching = "--enable-prefix-caching" if args.prefix_caching else "--no-enable-prefix-caching"
        proc, url = start_server(["--model", args.model, "--generator", args.generator, "--device", args.device,
                                  "--dtype", args.dtype, caching], args.max_running)
    waves = None
    try:
        asyncio.run(run_level(url, prompts, args.modes[0], 2, 4, 4))  # warm-up
        records = run_levels(url, prompts, args)
        if args.ttft_waves:
            waves = ttft_waves(url, prompts[:args.ttft_concurrency], args.modes, args.ttft_waves)
            log.info("ttft waves: %s", {m: round(v["median"], 4) for m, v in waves["ttft_p50_s"].items()})
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    base = {} if args.no_baselines else baselines(args, prompts)
    level = args.ttft_concurrency if args.ttft_concurrency in args.concurrency else max(args.concurrency)
    found = targets(records, base, level)
    if waves is not None:
        found["ttft_waves"] = waves
    report = {"machine": machine_info(),
              "workload": {"new_tokens": args.new_tokens, "varied_lengths": args.varied_lengths, "seed": args.seed,
                           "rounds": args.rounds, "model": args.model, "generator": args.generator,
                           "dtype": args.dtype, "max_running": args.max_running, "url": args.url or "local",
                           "prefix_caching": args.prefix_caching if args.url is None else "as the server at --url"},
              "records": records, "baselines_tok_per_s": base, "targets": found}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(records, Path(args.plot))
    print(table(records, base, report["targets"]))
    return 0


def targets(records: list[dict], base: dict, concurrency: int) -> dict:
    """At `concurrency`: HTTP ATV/off as the median of the per-round ratios (`ratio_detail` has min/max and
    the ratio of medians) and TTFT p50(atv) - TTFT p50(off) per round (`ttft_atv_minus_off`: seconds, and
    `ttft_atv_minus_off_fraction_of_off`, the median of the per-round (atv - off) / off); then the single-run
    baselines' ratios to the median HTTP ATV tok/s."""
    atv, off = (next((r for r in records if r["mode"] == mode and r["concurrency"] == concurrency), None)
                for mode in ("atv", "off"))
    if not (atv and off):
        return {}
    ratio = ratio_summary([r["tok_per_s"] for r in atv["rounds"]], [r["tok_per_s"] for r in off["rounds"]])
    out = {"concurrency": concurrency, "http_atv_over_http_off": ratio["median_of_round_ratios"],
           "ratio_detail": {"http_atv_over_http_off": ratio}}
    pairs = [(a["ttft_s"]["p50"], o["ttft_s"]["p50"]) for a, o in zip(atv["rounds"], off["rounds"])
             if a["ttft_s"]["p50"] is not None and o["ttft_s"]["p50"] is not None]
    if pairs:
        ttft = difference_summary([a for a, _ in pairs], [o for _, o in pairs])
        out.update(ttft_atv_minus_off_s=ttft["median_of_round_differences"],
                   ttft_atv_minus_off_fraction_of_off=ttft["median_of_round_fractions"], ttft_detail=ttft)
    if base:
        for name in ("naive_generate", "engine_atv", "hf_generate_batch"):
            if base.get(name):
                out[f"http_atv_over_{name}"] = atv["tok_per_s"] / base[name]
    return out


def table(records: list[dict], base: dict, targets: dict) -> str:
    lines = ["| mode | conc. | tok/s median (min-max) | req/s | TTFT p50/p95/p99 (s) | ITL p50/p95 (s) | "
             "E2E p50/p95 (s) | fail |", "|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in records:
        t, i, e, s = r["ttft_s"], r["itl_s"], r["e2e_s"], r["tok_per_s_spread"]
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['tok_per_s']:.1f} ({s['min']:.1f}-{s['max']:.1f}) | "
                     f"{r['req_per_s']:.2f} | {f(t['p50'])}/{f(t['p95'])}/{f(t['p99'])} | "
                     f"{f(i['p50'])}/{f(i['p95'])} | {f(e['p50'])}/{f(e['p95'])} | {r['failures']} |")
    if base:
        lines += ["", "| baseline (same prompts, concurrency %d, one run) | tok/s |" % base["concurrency"], "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in base.items() if isinstance(v, float)]
    if "ratio_detail" in targets:
        lines += ["", f"| at concurrency {targets['concurrency']} | value |", "|---|---|"]
        detail = targets["ratio_detail"]["http_atv_over_http_off"]
        low, high = detail["interval95"]
        lines.append(f"| HTTP ATV / off (median of per-round ratios; min-max; 95 % interval; ratio of medians) | "
                     f"{detail['median_of_round_ratios']:.3f}x; {detail['min']:.3f}-{detail['max']:.3f}; "
                     f"{low:.3f}-{high:.3f}; {detail['ratio_of_medians']:.3f}x |")
        if "ttft_detail" in targets:
            d = targets["ttft_detail"]
            low, high = d["fraction_interval95"]
            lines.append(f"| TTFT p50 atv - off (median of rounds; min-max; % of off, its 95 % interval) | "
                         f"{d['median_of_round_differences']:.3f} s; {d['min']:.3f}-{d['max']:.3f} s; "
                         f"{100 * d['median_of_round_fractions']:.1f} % ({100 * low:.1f} to {100 * high:.1f} %) |")
        lines += [f"| {k} | {v:.2f}x |" for k, v in targets.items() if k.startswith("http_atv_over_") and
                  k != "http_atv_over_http_off"]
    if "atv_minus_off" in targets.get("ttft_waves", {}):
        w, d = targets["ttft_waves"], targets["ttft_waves"]["atv_minus_off"]
        low, high = d["fraction_interval95"]
        lines += ["", "| TTFT from paired waves | value |", "|---|---|",
                  f"| TTFT atv - off, {w['waves']} paired waves of {w['concurrency']} one-token requests sent at once "
                  f"(median of pairs; % of off, its 95 % interval; off p50) | "
                  f"{d['median_of_round_differences']:.3f} s; {100 * d['median_of_round_fractions']:.1f} % "
                  f"({100 * low:.1f} to {100 * high:.1f} %); {w['ttft_p50_s']['off']['median']:.3f} s |"]
    return "\n".join(lines)
