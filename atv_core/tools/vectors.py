"""`atv vectors build` and `atv vectors list`: make and inspect the named vectors a server loads (--vectors DIR).

build: the static per-task vector of `atv eval` (evaluate.static_task_vector: the mean of the generator's
ungated vectors over the task's training queries, each under the task's templates in rotation), or the same
mean over K label-balanced training examples (`--examples K`; the generator reads their inputs only, never
their outputs). Written as `<out>/<name>.safetensors` + `<name>.json` (steering/vectors.py has the format).
list: every vector in a folder with its shape, norm, target and recipe; files that fail validation are listed
with the reason (exit status 1).

This module does not serve or apply vectors, and does not train a generator (`atv train`).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from atv_core.models import EMBEDDED_TARGET, generator_dir
from atv_core.steering.vectors import check_name, read_vector

log = logging.getLogger("atv.vectors")


def load_task(task_name: str | None, task_file: str | None, templates: list[str] | None):
    from atv_core.tools.tasks import load_suite, load_task_file

    if (task_name is None) == (task_file is None):
        raise ValueError("give exactly one of --task NAME (a suite task) or --task-file F (a JSONL file)")
    if task_name is not None:
        if templates:
            raise ValueError("--template applies to --task-file; a suite task has its own templates")
        return load_suite(names=[task_name])[0]
    return load_task_file(task_file, templates=templates or None)


def build_vector(task, generator, examples: int | None, seed: int):
    """-> (vector [L_sel, d], the number of training queries it averages)."""
    from atv_core.tools.evaluate import icl_prefix, static_task_vector

    chosen = icl_prefix(task, examples, seed) if examples else None
    count = len(chosen) if chosen is not None else len(task.required("train"))
    return static_task_vector(task, generator, chosen), count


def build(args) -> Path:
    from atv_core.models import load_target
    from atv_core.steering.checkpoint import load_generator
    from atv_core.steering.vectors import VectorLayout, write_vector

    check_name(args.name)
    out = Path(args.out)
    if (out / f"{args.name}.safetensors").exists() and not args.force:
        raise ValueError(f"{out / (args.name + '.safetensors')} exists; choose another --name or pass --force")
    task = load_task(args.task, args.task_file, args.template)
    task.required("train")   # refused before the model loads
    model, _ = load_target(args.model, args.device, "float32")
    generator = load_generator(generator_dir(args.generator), target=model, device=model.get_input_embeddings().weight.device)
    vector, count = build_vector(task, generator, args.examples, args.seed)
    built_from = {"recipe": "generator_mean" if not args.examples else "generator_mean_examples",
                  "generator": str(args.generator), "generator_target": generator.config.target,
                  "generator_scale": generator.config.scale, "task": task.name,
                  "task_file": str(Path(args.task_file).resolve()) if args.task_file else None,
                  "templates": list(task.templates), "split": "train", "queries": count,
                  "examples": args.examples, "seed": args.seed if args.examples else None}
    layout = VectorLayout.for_target(model, generator, args.model)
    path = write_vector(out, args.name, vector.cpu(), layout, built_from)
    print(f"wrote {path} ({layout.describe()}, norm {float(vector.norm()):.4g}, mean over {count} training "
          f"queries of {task.name})")
    return path


def build_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atv vectors build", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task-file", help="JSONL file of {input, output} records (split 60/20/20 by hash)")
    source.add_argument("--task", help="a task of the built-in suite (data/tasks), e.g. sentiment_rt")
    parser.add_argument("--name", required=True, help="the vector's name (requests send atv.vector = NAME)")
    parser.add_argument("--out", default="vectors", help="the folder the server loads with --vectors")
    parser.add_argument("--generator", default="default", help="generator checkpoint folder, or 'default'")
    parser.add_argument("--model", default=EMBEDDED_TARGET, help="the target model the server serves")
    parser.add_argument("--template", action="append", help="prompt template(s) with {input}, for --task-file "
                        "(default 'Input: {input}\\nOutput:'); use the format your clients send")
    parser.add_argument("--examples", type=int, help="average over K label-balanced training examples only")
    parser.add_argument("--seed", type=int, default=0, help="which examples --examples picks")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--force", action="store_true", help="overwrite an existing vector of that name")
    args = parser.parse_args(argv)
    if args.examples is not None and args.examples < 1:
        parser.error("--examples must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        build(args)
    except ValueError as exc:
        parser.exit(2, f"atv vectors build: error: {exc}\n")
    return 0


def list_rows(folder: Path) -> tuple[list[str], int]:
    """-> (one line per vector file, number of files that failed validation)."""
    rows, bad = [], 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            v = read_vector(path)
        except ValueError as exc:
            rows.append(f"{path.stem:24s} INVALID: {exc}")
            bad += 1
            continue
        source = v.meta.get("built_from") or {}
        rows.append(f"{v.name:24s} [{v.vector.shape[0]}, {v.vector.shape[1]}]  norm {v.norm:<9.4g} "
                    f"target {v.meta.get('target')}  position {v.meta.get('position') or '?'}  "
                    f"{source.get('recipe', '?')} of {source.get('task', '?')} "
                    f"({source.get('queries', '?')} queries)  {v.meta.get('created', '')}")
    return rows, bad


def list_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atv vectors list", description="list the named vectors in a folder")
    parser.add_argument("folder")
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        parser.exit(2, f"atv vectors list: error: {args.folder} is not a folder\n")
    rows, bad = list_rows(Path(args.folder))
    print("\n".join(rows) if rows else f"no vectors in {args.folder}")
    return 1 if bad else 0
