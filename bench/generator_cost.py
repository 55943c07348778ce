"""Cost of making vectors for one wave of 32 suite prompts: packed encoding with per-prompt attention (what
`ATVGenerator.encode` does), packed encoding under a block-diagonal [N, N] mask (its fallback, and what it did
before packing.py), and the padded batches packing replaced (prompts sorted by length, chunks of 8, each padded
to its longest), for each generator given. Rounds interleave the variants; medians and spread are printed.

    python bench/generator_cost.py [--rounds 7] [--generator DIR ...]

Run with nothing else on the machine: it is a timing.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from atv_core.models import DEFAULT_GENERATOR_DIR, EMBEDDED_TARGET, load_target
from atv_core.steering.checkpoint import load_generator
from atv_core.steering.generator import pool
from atv_core.tools.tasks import workload_prompts


def padded_chunks(generator, prompts: list[str], chunk: int = 8) -> torch.Tensor:
    """The previous encoding: length-sorted chunks, each padded to its longest prompt."""
    ids = generator.tokenizer(generator.format_inputs(prompts), truncation=True,
                              max_length=generator.config.max_input_tokens)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pooled = [None] * len(ids)
    for start in range(0, len(order), chunk):
        part = order[start: start + chunk]
        batch = generator.tokenizer.pad({"input_ids": [ids[i] for i in part]}, return_tensors="pt")
        out = generator.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for i, row in zip(part, pool(out.last_hidden_state, batch["attention_mask"], generator.config.pooling_mode)):
            pooled[i] = row
    return torch.stack(pooled)


def block_diagonal(generator, prompts: list[str]) -> torch.Tensor:
    """Packed encoding through the [N, N] block-diagonal mask instead of per-prompt attention."""
    kept = generator.packed_attention
    generator.packed_attention = False
    try:
        return generator.encode(prompts)
    finally:
        generator.packed_attention = kept


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--generator", nargs="+", default=[str(DEFAULT_GENERATOR_DIR)])
    args = parser.parse_args()
    target, tokenizer = load_target(EMBEDDED_TARGET, "cpu", "float32", None)
    prompts = workload_prompts(args.prompts)
    generators = {path: load_generator(path, target=target) for path in args.generator}
    n_target = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    variants = {}
    for path, g in generators.items():
        blocks = g.backbone.config.num_hidden_layers
        variants[f"{path} ({blocks} blocks) packed, per-prompt attention"] = lambda g=g: g.encode(prompts)
        variants[f"{path} ({blocks} blocks) packed, block-diagonal mask"] = lambda g=g: block_diagonal(g, prompts)
        variants[f"{path} ({blocks} blocks) padded chunks of 8"] = lambda g=g: padded_chunks(g, prompts)
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(timed(fn))
    g = next(iter(generators.values()))
    n_gen = sum(len(r) for r in g.tokenizer(g.format_inputs(prompts))["input_ids"])
    print(f"{len(prompts)} suite prompts: {n_gen} generator tokens, {n_target} target tokens; "
          f"torch threads {torch.get_num_threads()}; {args.rounds} interleaved rounds")
    for name, ms in times.items():
        print(f"{statistics.median(ms):8.1f} ms  (min {min(ms):.1f}, max {max(ms):.1f})  {name}")


if __name__ == "__main__":
    main()
