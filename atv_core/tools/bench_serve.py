"""`atv bench serve`: the HTTP server under streaming load, against the alternatives, in one run.

An async httpx load generator sends streaming /v1/completions at each concurrency level (closed loop:
`concurrency` workers, each sending its next request when the last finished) with prompts from the task
suite and a fixed completion length (`ignore_eos`), for ATV per-request vectors and steering off.
Per level: TTFT, inter-token latency and end-to-end latency (p50/p95/p99), request and output-token
throughput, failures. Then, on the same prompts and token counts, in this process: the engine driven
directly, sequential batch-1 hooked `generate`, and transformers' `generate_batch`.
With no --url it starts the embedded default server itself and stops it afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

log = logging.getLogger("atv.bench")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))]  # noqa: E731
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, mode: str, new_tokens: int) -> dict:
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
                    new_tokens: int) -> dict:
    queue = list(range(n_requests))
    results = []

    async def worker(client):
        while queue:
            i = queue.pop(0)
            try:
                results.append(await one_request(client, url, prompts[i % len(prompts)], mode, new_tokens))
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


def baselines(args, prompts: list[str]) -> dict:
    """Engine direct, sequential hooked generate and generate_batch, on the same prompts and lengths."""
    import torch

    from atv_core.engine.build import build_engine
    from atv_core.engine.llm_engine import EngineConfig
    from atv_core.tools.bench import hf_generate_batch, naive_generate, run_engine

    engine = build_engine(args.model, args.generator, device=args.device,
                          config=EngineConfig(max_running=args.max_running))
    model, tokenizer, generator = engine.model, engine.tokenizer, engine.generator
    n = args.baseline_concurrency
    batch = prompts[:n]
    run_engine(engine, batch[:4], "atv", 4)
    out = {"concurrency": n, "engine_atv": run_engine(engine, batch, "atv", args.new_tokens)["tok_per_s"],
           "engine_off": run_engine(engine, batch, "off", args.new_tokens)["tok_per_s"]}
    with torch.no_grad():
        vectors = generator(batch).vectors.to(model.dtype)
    k = min(args.naive_requests, n)
    out["naive_generate"] = naive_generate(model, tokenizer, batch[:k], vectors, generator.config.selected_layers,
                                           args.new_tokens)["tok_per_s"]
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

    parser = argparse.ArgumentParser(prog="atv bench serve", description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server; default: start the embedded default here")
    parser.add_argument("--model", default=EMBEDDED_TARGET)
    parser.add_argument("--generator", default=str(DEFAULT_GENERATOR_DIR))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--modes", nargs="+", default=["atv", "off"], choices=["atv", "off"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests-per-level", type=int, default=0, help="default: max(4, 2 x concurrency)")
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--baseline-concurrency", type=int, default=32)
    parser.add_argument("--naive-requests", type=int, default=8)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--json", default="bench/serve.json")
    parser.add_argument("--plot", default="bench/serve.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    prompts = workload_prompts(max(max(args.concurrency), args.baseline_concurrency) * 2)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(["--model", args.model, "--generator", args.generator], args.max_running)
    records = []
    try:
        asyncio.run(run_level(url, prompts, args.modes[0], 2, 4, 4))  # warm-up
        for concurrency in args.concurrency:
            for mode in args.modes:
                n = args.requests_per_level or max(4, 2 * concurrency)
                record = asyncio.run(run_level(url, prompts, mode, concurrency, n, args.new_tokens))
                log.info("%s c=%d: %.1f tok/s, ttft p50 %.3fs, failures %d", mode, concurrency,
                         record["tok_per_s"], record["ttft_s"]["p50"] or -1, record["failures"])
                records.append(record)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    base = {} if args.no_baselines else baselines(args, prompts)
    report = {"machine": machine_info(), "workload": {"new_tokens": args.new_tokens, "model": args.model,
                                                      "generator": args.generator, "url": args.url or "local"},
              "records": records, "baselines_tok_per_s": base, "targets": targets(records, base)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    plot(records, Path(args.plot))
    print(table(records, base, report["targets"]))
    return 0


def targets(records: list[dict], base: dict) -> dict:
    at = lambda mode: next((r for r in records if r["mode"] == mode and r["concurrency"] == base.get("concurrency")), None)  # noqa: E731
    atv, off = at("atv"), at("off")
    if not (atv and off and base):
        return {}
    out = {"http_atv_over_http_off": atv["tok_per_s"] / off["tok_per_s"],
           "http_atv_over_naive_generate": atv["tok_per_s"] / base["naive_generate"],
           "http_atv_over_engine_atv": atv["tok_per_s"] / base["engine_atv"]}
    if base.get("hf_generate_batch"):
        out["http_atv_over_hf_generate_batch"] = atv["tok_per_s"] / base["hf_generate_batch"]
    return out


def table(records: list[dict], base: dict, ratios: dict) -> str:
    lines = ["| mode | conc. | tok/s | req/s | TTFT p50/p95/p99 (s) | ITL p50/p95 (s) | E2E p50/p95 (s) | fail |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in records:
        t, i, e = r["ttft_s"], r["itl_s"], r["e2e_s"]
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['tok_per_s']:.1f} | {r['req_per_s']:.2f} | "
                     f"{f(t['p50'])}/{f(t['p95'])}/{f(t['p99'])} | {f(i['p50'])}/{f(i['p95'])} | "
                     f"{f(e['p50'])}/{f(e['p95'])} | {r['failures']} |")
    if base:
        lines += ["", "| baseline (same prompts, concurrency %d) | tok/s |" % base["concurrency"], "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in base.items() if isinstance(v, float)]
    if ratios:
        lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f}x |" for k, v in ratios.items()]
    return "\n".join(lines)
