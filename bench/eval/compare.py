"""Paired comparison of two `atv eval` runs on the same items: method A of run 1 minus method B of run 2.

Usage: python bench/eval/compare.py RUN1 RUN2 [--pairs atv:atv atv_nogate:atv_nogate] [--seeds 0 1 2]
Prints each pair's difference (points) with a paired bootstrap 95% interval over seeds x items, per task group.
Both runs must have scored the same test items (same --limit / template setting). Reads only JSON files.
"""
from __future__ import annotations

import argparse
import json
from argparse import Namespace
from pathlib import Path

from atv_core.tools.evaluate import paired_bootstrap
from atv_core.tools.tasks import load_suite


def merged(run1: Path, run2: Path, seed: int, a: str, b: str) -> dict:
    one = json.loads((run1 / f"seed{seed}" / "methods" / f"{a}.json").read_text())
    two = json.loads((run2 / f"seed{seed}" / "methods" / f"{b}.json").read_text())
    return {t: {"A": one[t], "B": two[t]} for t in one if t in two}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run1", type=Path)
    parser.add_argument("run2", type=Path)
    parser.add_argument("--pairs", nargs="+", default=["atv:atv", "atv_nogate:atv_nogate"])
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    tasks = [Namespace(name=t.name, seen=t.seen) for t in load_suite()]
    for pair in args.pairs:
        a, b = pair.split(":")
        data = [merged(args.run1, args.run2, seed, a, b) for seed in args.seeds]
        for group, seen in (("seen", True), ("unseen", False)):
            scored = [t for t in tasks if t.seen == seen and all(t.name in d for d in data)]
            if not scored:   # e.g. static vectors trained for the seen tasks only
                print(f"{args.run1.name}:{a} - {args.run2.name}:{b} ({group}): no task scored by both")
                continue
            cells = []
            for key, label in (("first", "first-token"), ("em", "exact match")):
                d = paired_bootstrap(data, scored, "A", "B", key)
                cells.append(f"{label} {100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]")
            print(f"{args.run1.name}:{a} - {args.run2.name}:{b} ({group}): " + "; ".join(cells))


if __name__ == "__main__":
    main()
