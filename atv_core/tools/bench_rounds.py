"""Rounds for the benchmarks: run variants interleaved, then summarise medians, spreads and ratios.

A benchmark with variants A, B, C runs `rounds` rounds; each round runs every variant once, in an order
rotated by one per round (A B C, B C A, C A B, ...), so slow drift of a shared machine and the position in
a round (first after a pause, last before one) fall on every variant alike. Each figure is then reported as
the median over rounds with its spread (min, max and the quartiles), and each ratio A/B twice: the median
of the per-round ratios (A and B measured minutes apart, so drift cancels), with a 95 % bootstrap interval that
says whether the run can tell it from a target, and the ratio of the medians.

Pure Python, no torch and no timing here: the callers time, this module orders and summarises, so the
arithmetic is testable on made-up figures. Seeded per-request output lengths live here too.
"""
from __future__ import annotations

import random
import statistics
from typing import Callable, TypeVar

T = TypeVar("T")


def round_order(names: list[str], round_index: int) -> list[str]:
    """The variants in round `round_index`: the list rotated left by round_index."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def run_rounds(variants: dict[str, Callable[[], T]], rounds: int,
               on_run: Callable[[int, str], None] | None = None) -> dict[str, list[T]]:
    """Call every variant once per round, rotated order -> {name: [result of round 0, round 1, ...]}."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    names = list(variants)
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        for name in round_order(names, r):
            if on_run is not None:
                on_run(r, name)
            results[name].append(variants[name]())
    return results


def spread(values: list[float]) -> dict:
    """median, min, max, quartiles (q1, q3: inclusive method; equal to the median for one value) and n."""
    if not values:
        raise ValueError("spread of no values: run at least one round")
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "q1": q1, "q3": q3,
            "n": len(ordered)}


def median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median of `values` (seeded: the same figures give the same
    interval). Whether a run can tell its median from a target: a target inside the interval is not shown either
    way, however the median falls."""
    if not values:
        raise ValueError("interval of no values: run at least one round")
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def ratio_summary(numerator: list[float], denominator: list[float]) -> dict:
    """A/B from paired rounds: median (min, max, 95 % bootstrap interval) of the per-round ratios, and the ratio of
    the medians."""
    if len(numerator) != len(denominator):
        raise ValueError(f"ratio of {len(numerator)} rounds over {len(denominator)}: pair the same rounds")
    per_round = [a / b for a, b in zip(numerator, denominator)]
    s = spread(per_round)
    return {"median_of_round_ratios": s["median"], "min": s["min"], "max": s["max"],
            "interval95": median_interval(per_round),
            "ratio_of_medians": statistics.median(numerator) / statistics.median(denominator), "rounds": per_round}


def difference_summary(a: list[float], b: list[float]) -> dict:
    """A - B from paired rounds (e.g. TTFT(atv) - TTFT(off)): median (min, max) of the per-round
    differences, the median of the per-round relative differences (A - B) / B with its 95 % bootstrap interval,
    and the medians' difference."""
    if len(a) != len(b):
        raise ValueError(f"difference of {len(a)} rounds and {len(b)}: pair the same rounds")
    diffs = [x - y for x, y in zip(a, b)]
    fractions = [d / y for d, y in zip(diffs, b)]
    s = spread(diffs)
    return {"median_of_round_differences": s["median"], "min": s["min"], "max": s["max"],
            "median_of_round_fractions": statistics.median(fractions), "fraction_interval95": median_interval(fractions),
            "difference_of_medians": statistics.median(a) - statistics.median(b), "rounds": diffs}


def summarize(rounds: dict[str, list[float]], ratios: dict[str, tuple[str, str]]) -> dict:
    """{"figures": {name: spread}, "ratios": {ratio name: ratio_summary(rounds[a], rounds[b])}};
    a ratio whose variants did not run is left out."""
    return {"figures": {name: spread(values) for name, values in rounds.items() if values},
            "ratios": {name: ratio_summary(rounds[a], rounds[b]) for name, (a, b) in ratios.items()
                       if rounds.get(a) and rounds.get(b)}}


def output_lengths(n: int, new_tokens: int, varied: bool, seed: int = 0) -> list[int]:
    """Each request's max_tokens: new_tokens for all, or (varied) drawn uniformly from
    [new_tokens / 4, 7 new_tokens / 4] (mean new_tokens) with a seeded generator: the same list for every
    variant and every round of a run."""
    if new_tokens < 1:
        raise ValueError(f"new tokens must be at least 1, got {new_tokens}")
    if not varied:
        return [new_tokens] * n
    rng = random.Random(seed)
    low = max(1, new_tokens // 4)
    return [rng.randint(low, 2 * new_tokens - low) for _ in range(n)]
