"""Combine per-seed `atv eval` results computed in separate runs into one run folder, for `atv eval --seeds ...`
to aggregate (it reads `seedS/results.json` as it is and recomputes nothing) and for `bench/eval/compare.py`
(it reads `seedS/methods/<method>.json`).

    python bench/eval/served_chat/combine_seeds.py OUT SEED FILE:METHOD,METHOD... [FILE:METHOD...] [-- SEED ...]

Each FILE is a `results.json` (or a `results_seedS.json` copy): {task: {method: scores}, "_generic": {...}}.
The methods named are taken from it ("_generic": the do-no-harm check); a method named twice is an error.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def combine(sources: list[tuple[str, list[str]]]) -> dict:
    merged: dict = {}
    taken: set[str] = set()
    for path, methods in sources:
        data = json.loads(Path(path).read_text())
        for method in methods:
            if method in taken:
                raise SystemExit(f"{method} is named twice")
            taken.add(method)
            if method == "_generic":
                merged["_generic"] = data["_generic"]
                continue
            found = [task for task, row in data.items() if task != "_generic" and method in row]
            if not found:
                raise SystemExit(f"{path} has no {method}")
            for task in found:
                merged.setdefault(task, {})[method] = data[task][method]
    return merged


def main(argv: list[str]) -> None:
    out, rest = Path(argv[0]), argv[1:]
    groups = [g for g in " ".join(rest).split(" -- ")]
    for group in groups:
        seed, *specs = group.split()
        sources = [(spec.rsplit(":", 1)[0], spec.rsplit(":", 1)[1].split(",")) for spec in specs]
        folder = out / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        merged = combine(sources)
        (folder / "results.json").write_text(json.dumps(merged))
        (folder / "methods").mkdir(exist_ok=True)
        for method in {m for _, ms in sources for m in ms} - {"_generic"}:
            rows = {task: row[method] for task, row in merged.items() if task != "_generic" and method in row}
            (folder / "methods" / f"{method}.json").write_text(json.dumps(rows))
        print(f"seed {seed}: {', '.join(m for _, ms in sources for m in ms)} -> {folder / 'results.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
