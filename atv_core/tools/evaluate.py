"""`atv eval`: compare zero-shot, ICL, a static per-task vector, the shared vector, LoRA and ATV.

Every method answers the same test prompts (one template per item, rotating) by greedy generation through
the serving engine, so the numbers are what a served request would get. Two metrics:
- first-token accuracy (the paper's), on the first non-whitespace token: SmolLM2 splits " 48" into
  " ", "4", "8", so the literal first token would be a free space for number answers;
- exact match: the first line of the answer, stripped of spaces and a final ".", equals the gold output
  (case-insensitive).
Per task, seen and unseen averages, mean +- std over seeds; JSON, a markdown table and a PNG plot.
Training for ATV / shared / LoRA reuses `train.py` with the same recipe, cached per seed in the run folder.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import statistics
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from atv_core.steering.checkpoint import load_generator
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.models import load_target
from atv_core.engine.request import Request, SamplingParams, SteeringSpec
from atv_core.tools.tasks import Task, load_suite, load_task_file
from atv_core.tools.train import PRESETS, TrainConfig, answer_loss, encode, select_tasks, train, training_items

log = logging.getLogger("atv.eval")
METHODS = ("zero_shot", "icl", "task_vector", "shared", "lora", "atv", "atv_nogate")


def test_prompts(task: Task, limit: int | None = None) -> list[tuple[str, str]]:
    examples = task.examples("test")[:limit] if limit else task.examples("test")
    return [(task.prompt(ex.input, i % len(task.templates)), ex.output) for i, ex in enumerate(examples)]


def icl_prefix(task: Task, k: int, seed: int) -> list:
    """k training demonstrations, balanced across labels where the task has labels."""
    rng = random.Random(seed)
    pool = task.examples("train")[:]
    rng.shuffle(pool)
    if task.labels:
        by_label = {label: [e for e in pool if e.output == label] for label in task.labels}
        demos, i = [], 0
        while len(demos) < k and any(by_label.values()):
            label = task.labels[i % len(task.labels)]
            if by_label[label]:
                demos.append(by_label[label].pop())
            i += 1
    else:
        demos = pool[:k]
    return demos


def with_demos(task: Task, prompt_index: int, query_prompt: str, demos) -> str:
    t = prompt_index % len(task.templates)
    shots = [task.prompt(d.input, t) + " " + d.output for d in demos]
    return "\n\n".join(shots + [query_prompt])


def first_content_token(tokenizer, text: str) -> str | None:
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        piece = tokenizer.decode([token]).strip()
        if piece:
            return piece
    return None


def normalise(text: str) -> str:
    return text.strip().split("\n")[0].strip().rstrip(".").strip().lower()


def run_engine(engine: LLMEngine, prompts: list[str], vectors=None, mode="off", max_new_tokens=6) -> list[Request]:
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=("\n",))
    requests = []
    for i, prompt in enumerate(prompts):
        vector = vectors[i] if vectors is not None else None
        requests.append(Request(f"e{i}", tok(prompt)["input_ids"], params, SteeringSpec(mode), prompt, vector=vector))
    pending = list(requests)
    while pending or engine.has_work():
        while pending and len(engine.scheduler.waiting) < engine.config.max_waiting:
            engine.add_request(pending.pop(0))
        engine.step()
    return requests


def score(tokenizer, requests: list[Request], golds: list[str]) -> tuple[float, float]:
    first = em = 0
    for request, gold in zip(requests, golds):
        produced = tokenizer.decode(request.output_ids, skip_special_tokens=True)
        first += first_content_token(tokenizer, produced) == first_content_token(tokenizer, " " + gold)
        em += normalise(produced) == normalise(gold)
    return first / len(golds), em / len(golds)


def train_lora(cfg: TrainConfig, model, tokenizer, rank: int, out: Path):
    """LoRA on q/v projections, same data, loss and epochs as ATV; returns a merged copy of the target."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                                 target_modules=["q_proj", "v_proj"]))
    n_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    tasks = select_tasks(cfg)
    items = training_items(tasks, "train", cfg.seed, cfg.max_per_task)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr / 4,
                                  weight_decay=cfg.weight_decay)
    peft_model.train()
    for epoch in range(cfg.epochs):
        random.Random(cfg.seed * 1000 + epoch).shuffle(items)
        for i in tqdm(range(0, len(items), cfg.batch_size), desc=f"lora epoch {epoch + 1}", leave=False):
            chunk = items[i: i + cfg.batch_size]
            batch = encode(tokenizer, [x.prompt for x in chunk], [x.target for x in chunk], "cpu")
            loss = answer_loss(peft_model.get_base_model(), batch, None, None, None)  # LoRA layers sit inside it
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    merged = peft_model.merge_and_unload().eval()
    (out / "lora.json").write_text(json.dumps({"rank": rank, "trainable_params": n_params}))
    return merged, n_params


def static_task_vector(task: Task, generator, examples=None) -> torch.Tensor:
    """The static per-task vector [L_sel, d]: the mean of the generator's ungated vectors over the task's
    training queries (default: the whole train split), each under one template in rotation."""
    examples = task.examples("train") if examples is None else examples
    prompts = [task.prompt(e.input, i % len(task.templates)) for i, e in enumerate(examples)]
    with torch.no_grad():
        return generator(prompts, use_gate=False).vectors.mean(0)


def method_prompts(method: str, task: Task, prompts: list[str], seed: int, k: int, generator, shared_path):
    """-> (prompts to send, per-request vectors or None, steering mode) for one method on one task."""
    if method == "icl":
        demos = icl_prefix(task, k, seed)
        return [with_demos(task, i, p, demos) for i, p in enumerate(prompts)], None, "off"
    if method == "atv":
        return prompts, None, "atv"
    with torch.no_grad():
        if method == "atv_nogate":
            return prompts, list(generator(prompts, use_gate=False).vectors), "atv"
        if method == "task_vector":
            return prompts, [static_task_vector(task, generator)] * len(prompts), "atv"
    if method == "shared":
        from safetensors.torch import load_file
        v = load_file(str(shared_path))["v"] * generator.config.scale
        return prompts, [v] * len(prompts), "atv"
    return prompts, None, "off"  # zero_shot, and lora (through its own merged model)


def run_method(engine, method, tasks, seed, args, generator, shared_path) -> dict:
    """All tasks' prompts of one method through the engine in one go (full batches); scores per task."""
    plan, all_prompts, all_vectors, modes = [], [], [], set()
    for task in tasks:
        items = test_prompts(task, args.limit)
        prompts, vectors, mode = method_prompts(method, task, [p for p, _ in items], seed, args.k, generator,
                                                shared_path)
        plan.append((task, [g for _, g in items], len(all_prompts), len(prompts)))
        all_prompts += prompts
        all_vectors += vectors if vectors is not None else [None] * len(prompts)
        modes.add(mode)
    requests = run_engine(engine, all_prompts, all_vectors, modes.pop())
    results = {}
    for task, golds, offset, n in plan:
        chunk = requests[offset: offset + n]
        results[task.name] = dict(zip(("first_token", "exact_match"), score(engine.tokenizer, chunk, golds)))
        if method == "atv":
            results[task.name]["mean_gate"] = statistics.mean(r.steering_report.gate for r in chunk)
    return results


def evaluate_seed(seed: int, args, model, tokenizer, tasks: list[Task], cached: dict) -> dict:
    out = Path(args.out) / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    cfg = replace(PRESETS["default"], seed=seed, epochs=args.epochs, max_per_task=args.max_per_task,
                  out=str(out / "atv"))
    if args.generator and seed == args.seeds[0]:
        atv_dir = Path(args.generator)
    else:
        atv_dir = out / "atv" / "generator"
        if not (out / "atv" / "DONE").exists():
            train(cfg, model, tokenizer)
            (out / "atv" / "DONE").write_text("")
    generator = load_generator(atv_dir, target=model)
    shared_path = out / "shared" / "shared_vector.safetensors"
    if "shared" in args.methods and not (out / "shared" / "DONE").exists():
        train(replace(cfg, shared=True, out=str(out / "shared")), model, tokenizer)
        (out / "shared" / "DONE").write_text("")
    engine = LLMEngine(model, tokenizer, generator, EngineConfig(max_running=32, max_waiting=100_000))
    by_method = {}
    for method in tqdm(args.methods, desc=f"seed {seed}: methods"):
        done = out / "methods" / f"{method}.json"   # each method's scores are kept as soon as they exist
        if done.exists():
            by_method[method] = json.loads(done.read_text())
            if method == "zero_shot":
                cached["zero_shot"] = by_method[method]
            continue
        if method == "lora":
            lora_dir = out / "lora"
            lora_dir.mkdir(parents=True, exist_ok=True)
            merged, _ = train_lora(cfg, model, tokenizer, args.lora_rank, lora_dir)
            lora_engine = LLMEngine(merged, tokenizer, None, EngineConfig(max_running=32, max_waiting=100_000))
            by_method[method] = run_method(lora_engine, method, tasks, seed, args, generator, shared_path)
        elif method == "zero_shot" and "zero_shot" in cached:  # deterministic: the same for every seed
            by_method[method] = cached["zero_shot"]
        else:
            by_method[method] = run_method(engine, method, tasks, seed, args, generator, shared_path)
            if method == "zero_shot":
                cached["zero_shot"] = by_method[method]
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(by_method[method], indent=2))
    results = {task.name: {m: by_method[m][task.name] for m in by_method} for task in tasks}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def aggregate(per_seed: list[dict], tasks: list[Task], methods) -> dict:
    """-> {method: {metric: {task|'seen'|'unseen': (mean, std)}}}"""
    summary = {}
    for method in methods:
        summary[method] = {}
        for metric in ("first_token", "exact_match"):
            rows = {}
            for task in tasks:
                values = [r[task.name][method][metric] for r in per_seed if method in r[task.name]]
                rows[task.name] = _mean_std(values)
            for group, seen in (("seen", True), ("unseen", False)):
                values = [statistics.mean(r[t.name][method][metric] for t in tasks if t.seen == seen)
                          for r in per_seed if any(t.seen == seen for t in tasks)]
                rows[group] = _mean_std(values)
            summary[method][metric] = rows
    return summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return (float("nan"), float("nan"))
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_table(summary: dict, tasks: list[Task], metric: str) -> str:
    methods = list(summary)
    cols = ["seen", "unseen"] + [t.name for t in tasks]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        cells = [f"{100 * summary[m][metric][c][0]:.1f}±{100 * summary[m][metric][c][1]:.1f}" for c in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, tasks: list[Task], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["seen", "unseen"] + [t.name for t in tasks]
    fig, ax = plt.subplots(figsize=(max(10, len(cols) * 0.9), 4.5))
    width = 0.8 / len(summary)
    for i, (method, s) in enumerate(summary.items()):
        means = [s["first_token"][c][0] for c in cols]
        stds = [s["first_token"][c][1] for c in cols]
        ax.bar([x + i * width for x in range(len(cols))], means, width, yerr=stds, label=method)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cols))], cols, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("first-token accuracy")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atv eval", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/eval")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tasks", nargs="+", help="suite task names (default: all)")
    parser.add_argument("--task-file", nargs="+", default=[], help="extra JSONL files of {input, output}")
    parser.add_argument("--generator", help="use this checkpoint for the first seed instead of training one")
    parser.add_argument("--k", type=int, default=5, help="ICL demonstrations")
    parser.add_argument("--limit", type=int, help="test items per task")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-per-task", type=int, default=80)
    parser.add_argument("--lora-rank", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model, tokenizer = load_target(PRESETS["default"].target, "auto", "float32")
    tasks = load_suite(names=args.tasks) + [load_task_file(p) for p in args.task_file]
    cached: dict = {}
    per_seed = [evaluate_seed(seed, args, model, tokenizer, tasks, cached) for seed in args.seeds]
    summary = aggregate(per_seed, tasks, args.methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"seeds": args.seeds, "summary": summary}, indent=2))
    report = ["## first-token accuracy (%)", markdown_table(summary, tasks, "first_token"),
              "", "## exact match (%)", markdown_table(summary, tasks, "exact_match")]
    (out / "table.md").write_text("\n".join(report) + "\n")
    plot(summary, tasks, out / "eval.png")
    print("\n".join(report))
    return 0
