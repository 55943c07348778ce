"""`atv eval`: compare zero-shot, ICL, two static vectors, the shared vector, LoRA and ATV (query-conditioned,
ungated, and conditioned on k demonstrations), plus a do-no-harm check on generic prompts.

Every method answers the same test prompts (by default every test item under every template of its task) by
greedy generation through the serving engine, so the numbers are what a served request would get. Metrics:
- first-token accuracy (the paper's), on the first non-whitespace token: SmolLM2 splits " 48" into
  " ", "4", "8", so the literal first token would be a free space for number answers;
- exact match: the first line of the answer, stripped of spaces and a final ".", equals the gold output
  (case-insensitive);
- target prompt tokens per query (ICL pays for its demonstrations there; ATV with examples does not: the
  generator reads them, the target sees the query alone).
Per-item scores are kept, so ATV minus each baseline gets a paired bootstrap 95% interval over seeds x items
(resampled within each task, tasks weighted equally). Generic prompts (chat, code, translation, stories;
32 greedy tokens) measure how often ATV's output is identical to steering off.
Training for ATV / shared / static / LoRA reuses `train.py`, cached per seed in the run folder; every
method's scores are written as soon as they exist, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import statistics
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from atv_core.steering.checkpoint import load_generator
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.models import generator_dir, load_target
from atv_core.engine.request import Request, SamplingParams, SteeringSpec, chat_query
from atv_core.engine.vector_worker import generate
from atv_core.tools.tasks import Task, default_data_dir, load_suite, load_task_file, unique_names
from atv_core.tools.train import (PRESETS, TrainConfig, answer_loss, chat_prompt, control_file, encode,
                                  load_task_vectors, with_config_file, read_prompts, select_tasks, train, training_items)

log = logging.getLogger("atv.eval")
METHODS = ("zero_shot", "icl", "task_vector", "static", "shared", "lora", "atv", "atv_nogate", "atv_examples")
BASELINES = ("zero_shot", "icl", "task_vector", "static", "shared", "lora")
GENERIC_TOKENS = 32


def test_prompts(task: Task, limit: int | None = None, all_templates: bool = True) -> list[tuple[str, str, int]]:
    """(prompt, gold, template index) per test item under every template (item-major), or one rotating
    template per item."""
    examples = task.required("test")[:limit] if limit else task.required("test")
    n = len(task.templates)
    pairs = [(ex, t) for ex in examples for t in range(n)] if all_templates else \
        [(ex, i % n) for i, ex in enumerate(examples)]
    return [(task.prompt(ex.input, t), ex.output, t) for ex, t in pairs]


def icl_prefix(task: Task, k: int, seed: int) -> list:
    """k training demonstrations, balanced across labels where the task has labels."""
    rng = random.Random(seed)
    pool = task.required("train")[:]
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


def with_demos(task: Task, template_index: int, query_prompt: str, demos) -> str:
    """ICL: the demonstrations under the query's own template, then the query."""
    shots = [task.prompt(d.input, template_index) + " " + d.output for d in demos]
    return "\n\n".join(shots + [query_prompt])

def first_content_token(tokenizer, text: str) -> str | None:
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        piece = tokenizer.decode([token]).strip()
        if piece:
            return piece
    return None


def normalise(text: str) -> str:
    return text.strip().split("\n")[0].strip().rstrip(".").strip().lower()


def run_engine(engine: LLMEngine, prompts: list[str], vectors=None, mode="off", max_new_tokens=6,
               stop=("\n",), queries: list[str] | None = None) -> list[Request]:
    """Greedy answers to `prompts`; queries: what the generator reads of each (default: the prompt)."""
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=tuple(stop))
    requests = []
    for i, prompt in enumerate(prompts):
        vector = vectors[i] if vectors is not None else None
        query = prompt if queries is None else queries[i]
        requests.append(Request(f"e{i}", tok(prompt)["input_ids"], params, SteeringSpec(mode), query, vector=vector))
    pending = list(requests)
    while pending or engine.has_work():
        while pending and len(engine.scheduler.waiting) < engine.config.max_waiting:
            engine.add_request(pending.pop(0))
        engine.step()
    return requests


def item_scores(tokenizer, requests: list[Request], golds: list[str]) -> dict:
    """Per item: first-token hit, exact-match hit (0/1), and the target's prompt tokens."""
    first, em = [], []
    for request, gold in zip(requests, golds):
        produced = tokenizer.decode(request.output_ids, skip_special_tokens=True)
        first.append(int(first_content_token(tokenizer, produced) == first_content_token(tokenizer, " " + gold)))
        em.append(int(normalise(produced) == normalise(gold)))
    return {"first": first, "em": em, "prompt_tokens": [r.num_prompt_tokens for r in requests]}


def score(tokenizer, requests: list[Request], golds: list[str]) -> tuple[float, float]:
    items = item_scores(tokenizer, requests, golds)
    return statistics.mean(items["first"]), statistics.mean(items["em"])


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
            batch = encode(tokenizer, [x.prompt for x in chunk], [x.target for x in chunk], model.device)
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
    examples = task.required("train") if examples is None else examples
    prompts = [task.prompt(e.input, i % len(task.templates)) for i, e in enumerate(examples)]
    with torch.no_grad():
        return generator(prompts, use_gate=False).vectors.mean(0)


def method_prompts(method: str, task: Task, items: list[tuple[str, str, int]], seed: int, k: int, generator,
                   controls: dict):
    """-> (prompts to send, per-request vectors or None, steering mode, gates or None) for one method on one task.
    `controls`: {"shared": [L_sel, d] or None, "static": {task: [L_sel, d]}} (already in the served scale)."""
    prompts = [p for p, _, _ in items]
    if method == "icl":
        demos = icl_prefix(task, k, seed)
        return [with_demos(task, t, p, demos) for p, _, t in items], None, "off", None
    if method == "atv":
        return prompts, None, "atv", None
    if method == "atv_nogate":
        with torch.no_grad():
            out = generator(prompts, use_gate=False)
        return prompts, list(out.vectors), "atv", out.gates.tolist()
    if method == "atv_examples":   # the generator reads k demonstrations (the ICL ones); the target the query alone
        demos = icl_prefix(task, k, seed)   # as served: a gate below the checkpoint's gate_open adds no vector
        vectors, gates = generate(generator, [generator.format_input(p, demos) for p in prompts])
        return prompts, list(vectors), "atv", gates
    if method == "task_vector":
        return prompts, [static_task_vector(task, generator)] * len(prompts), "atv", None
    if method == "shared":
        return prompts, [controls["shared"]] * len(prompts), "atv", None
    if method == "static":
        return prompts, [controls["static"][task.name]] * len(prompts), "atv", None
    return prompts, None, "off", None  # zero_shot, and lora (through its own merged model)


def run_method(engine, method, tasks, seed, args, generator, controls) -> dict:
    """All tasks' prompts of one method through the engine in one go (full batches); scores per task."""
    plan, all_prompts, all_vectors, modes = [], [], [], set()
    for task in tasks:
        if method == "static" and task.name not in controls["static"]:
            log.warning("no directly trained static vector for task %s: static is not scored there", task.name)
            continue
        items = test_prompts(task, args.limit, not args.rotate_templates)
        prompts, vectors, mode, gates = method_prompts(method, task, items, seed, args.k, generator, controls)
        plan.append((task, [g for _, g, _ in items], [t for _, _, t in items], len(all_prompts), len(prompts), gates))
        all_prompts += prompts
        all_vectors += vectors if vectors is not None else [None] * len(prompts)
        modes.add(mode)
    requests = run_engine(engine, all_prompts, all_vectors, modes.pop())
    results = {}
    for task, golds, templates, offset, n, gates in plan:
        chunk = requests[offset: offset + n]
        row = item_scores(engine.tokenizer, chunk, golds)
        if method == "atv":
            gates = [r.steering_report.gate for r in chunk]
        if gates is not None:
            row["gates"] = [float(g) for g in gates]
            row["mean_gate"] = statistics.mean(row["gates"])
        row["templates"] = templates
        row.update(first_token=statistics.mean(row["first"]), exact_match=statistics.mean(row["em"]),
                   mean_prompt_tokens=statistics.mean(row["prompt_tokens"]))
        results[task.name] = row
    return results


def generic_check(engine: LLMEngine, generator, path, tokens: int = GENERIC_TOKENS) -> dict:
    """Generic prompts as chat requests, as the server sends them (the target reads the chat-templated prompt, the
    generator the user text: chat_query): how often ATV's greedy output equals steering off (gated and ungated)."""
    rows = read_prompts(path)
    prompts = [chat_prompt(engine.tokenizer, r["prompt"]) for r in rows]
    queries = [chat_query([("user", r["prompt"])]) for r in rows]
    off = run_engine(engine, prompts, None, "off", tokens, stop=())
    served = run_engine(engine, prompts, None, "atv", tokens, stop=(), queries=queries)
    with torch.no_grad():
        ungated = list(generator(queries, use_gate=False).vectors)
    nogate = run_engine(engine, prompts, ungated, "atv", tokens, stop=())
    same = [a.output_ids == b.output_ids for a, b in zip(off, served)]
    same_nogate = [a.output_ids == b.output_ids for a, b in zip(off, nogate)]
    return {"n": len(rows), "tokens": tokens, "identical_atv": statistics.mean(same),
            "identical_atv_nogate": statistics.mean(same_nogate),
            "gates": [float(r.steering_report.gate) for r in served],
            "kinds": [r.get("kind", "") for r in rows], "identical": same}


def default_generic_prompts() -> Path:
    return default_data_dir() / "generic" / "eval.jsonl"


def load_controls(args, seed: int, cfg: TrainConfig, model, tokenizer, tasks: list[Task], out: Path, scale: float) -> dict:
    """The shared vector and the directly trained per-task vectors of this seed (trained once, cached)."""
    controls: dict = {"shared": None, "static": {}}
    if "shared" in args.methods:
        if not (out / "shared" / "DONE").exists():
            train(replace(cfg, shared=True, gate="none", out=str(out / "shared")), model, tokenizer)
            (out / "shared" / "DONE").write_text("")
        from safetensors.torch import load_file
        controls["shared"] = load_file(str(out / "shared" / control_file(cfg)))["v"] * scale
    if "static" in args.methods:
        path = Path(args.static_vectors) if args.static_vectors and seed == args.seeds[0] else \
            out / "static" / "task_vectors.safetensors"
        if not path.exists():
            names = tuple(t.name for t in tasks if t.kind != "custom")
            files = tuple(str(t.root) for t in tasks if t.kind == "custom")
            train(replace(cfg, static=True, gate="none", tasks=names, task_files=files,
                          out=str(out / "static")), model, tokenizer)
        controls["static"] = {k: v * scale for k, v in load_task_vectors(path).items()}
    return controls


def evaluate_seed(seed: int, args, model, tokenizer, tasks: list[Task], cached: dict) -> dict:
    out = Path(args.out) / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    cfg = replace(recipe(args), seed=seed, epochs=args.epochs, max_per_task=args.max_per_task, out=str(out / "atv"))
    if args.generator and seed == args.seeds[0]:
        atv_dir = generator_dir(args.generator)
    else:
        atv_dir = out / "atv" / "generator"
        if not (out / "atv" / "DONE").exists():
            train(cfg, model, tokenizer)
            (out / "atv" / "DONE").write_text("")
    generator = load_generator(atv_dir, target=model)
    methods = [m for m in args.methods if m != "atv_examples" or generator.config.reads_examples]
    skipped = sorted(set(args.methods) - set(methods))
    if skipped:
        log.warning("skipping %s: the generator was not trained to read examples", skipped)
    controls = load_controls(args, seed, cfg, model, tokenizer, tasks, out, generator.config.scale)
    engine = LLMEngine(model, tokenizer, generator, EngineConfig(max_running=32, max_waiting=100_000))
    by_method = {}
    for method in tqdm(methods, desc=f"seed {seed}: methods"):
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
            by_method[method] = run_method(lora_engine, method, tasks, seed, args, generator, controls)
        elif method == "zero_shot" and "zero_shot" in cached:  # deterministic: the same for every seed
            by_method[method] = cached["zero_shot"]
        else:
            by_method[method] = run_method(engine, method, tasks, seed, args, generator, controls)
        if method == "zero_shot":
            cached["zero_shot"] = by_method[method]
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(by_method[method]))
    results = {task.name: {m: by_method[m][task.name] for m in by_method if task.name in by_method[m]} for task in tasks}
    if args.generic != "none":
        done = out / "methods" / "generic.json"
        if not done.exists():
            done.write_text(json.dumps(generic_check(engine, generator, args.generic or default_generic_prompts())))
        results["_generic"] = json.loads(done.read_text())
    (out / "results.json").write_text(json.dumps(results))
    return results


def aggregate(per_seed: list[dict], tasks: list[Task], methods) -> dict:
    """-> {method: {metric: {task|'seen'|'unseen': (mean, std over seeds)}}}; metrics include prompt tokens."""
    summary = {}
    for method in methods:
        if not any(method in r[t.name] for r in per_seed for t in tasks):
            continue
        summary[method] = {}
        for metric in ("first_token", "exact_match", "mean_prompt_tokens"):
            rows = {}
            for task in tasks:
                values = [r[task.name][method][metric] for r in per_seed if method in r[task.name]]
                rows[task.name] = _mean_std(values)
            for group, seen in (("seen", True), ("unseen", False)):
                group_tasks = [t for t in tasks if t.seen == seen]
                values = [statistics.mean(r[t.name][method][metric] for t in group_tasks)
                          for r in per_seed if group_tasks and all(method in r[t.name] for t in group_tasks)]
                rows[group] = _mean_std(values)
            summary[method][metric] = rows
    return summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, std over seeds); std is NaN with one seed, both are NaN with none."""
    if not values:
        return (float("nan"), float("nan"))
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan"))


def paired_bootstrap(per_seed: list[dict], tasks: list[Task], a: str, b: str, key: str, reps: int = 2000,
                     seed: int = 0) -> tuple[float, float, float] | None:
    """Mean of (a - b) over `tasks` (tasks weighted equally) with a 95% percentile interval, resampling the
    (seed, item) pairs within each task. `key` is "first" or "em". None if a method lacks a task."""
    import numpy as np

    diffs = []
    for task in tasks:
        rows = [r[task.name] for r in per_seed if a in r[task.name] and b in r[task.name]]
        if not rows:
            return None
        diffs.append(np.concatenate([np.array(r[a][key], float) - np.array(r[b][key], float) for r in rows]))
    rng = np.random.default_rng(seed)
    boots = np.zeros(reps)
    for d in diffs:
        boots += d[rng.integers(0, len(d), size=(reps, len(d)))].mean(axis=1)
    boots /= len(diffs)
    point = float(np.mean([d.mean() for d in diffs]))
    low, high = np.percentile(boots, [2.5, 97.5])
    return point, float(low), float(high)


def differences(per_seed: list[dict], tasks: list[Task], methods, contenders=("atv", "atv_nogate", "atv_examples")) -> dict:
    """{contender: {baseline: {group: {metric: (diff, low, high)}}}} for ATV variants minus each baseline."""
    out = {}
    for a in (m for m in contenders if m in methods):
        out[a] = {}
        for b in (m for m in BASELINES if m in methods):
            out[a][b] = {}
            for group, seen in (("seen", True), ("unseen", False)):
                group_tasks = [t for t in tasks if t.seen == seen]
                if group_tasks:
                    out[a][b][group] = {k: paired_bootstrap(per_seed, group_tasks, a, b, k) for k in ("first", "em")}
    return out


def shared_templates(tasks: list[Task]) -> set[tuple[str, int]]:
    """(task, template index) pairs whose template text another task of `tasks` also uses. Such a prompt does not
    say which task it is ("Input: 422\nOutput:" is both next_number's and number_parity's prompt), so a method that
    reads only the prompt cannot know the task there, while a method told the task (a static vector per task) or
    shown it (ICL's demonstrations, ATV's examples) can."""
    users: dict[str, set[str]] = {}
    for task in tasks:
        for template in task.templates:
            users.setdefault(template, set()).add(task.name)
    return {(t.name, i) for t in tasks for i, template in enumerate(t.templates) if len(users[template]) > 1}


def item_templates(row: dict, task: Task) -> list[int]:
    """Each scored prompt's template index (results written before it was stored: i mod the template count,
    which both of test_prompts' orders give)."""
    return row.get("templates") or [i % len(task.templates) for i in range(len(row["first"]))]


TEMPLATE_GROUPS = (("seen, own template", True, False), ("seen, shared template", True, True),
                   ("unseen, own template", False, False), ("unseen, shared template", False, True))


def restrict(results: dict, tasks: list[Task], pairs: set[tuple[str, int]]) -> dict:
    """One seed's results cut to the prompts under `pairs` ((task, template index)), each method's means
    recomputed; a task with no such prompt is left out."""
    out = {}
    for task in tasks:
        rows = {}
        for method, row in results.get(task.name, {}).items():
            keep = [(task.name, i) in pairs for i in item_templates(row, task)]
            if any(keep):
                cut = {k: [x for x, y in zip(row[k], keep) if y] for k in ("first", "em", "prompt_tokens") if k in row}
                rows[method] = {**cut, "first_token": statistics.mean(cut["first"]),
                                "exact_match": statistics.mean(cut["em"]),
                                "mean_prompt_tokens": statistics.mean(cut.get("prompt_tokens") or [math.nan])}
        if rows:
            out[task.name] = rows
    return out


def by_template(per_seed: list[dict], tasks: list[Task], methods) -> dict:
    """First-token and exact-match means (mean, std over seeds) and ATV minus each baseline [95% interval] on the
    prompts under a task's own template vs a template shared with another task (`shared_templates`): `aggregate`
    and `differences` over the results cut to each kind of prompt."""
    shared = shared_templates(tasks)
    every = {(t.name, i) for t in tasks for i in range(len(t.templates))}
    reports = {}
    for is_shared in (False, True):
        cut = [restrict(r, tasks, shared if is_shared else every - shared) for r in per_seed]
        kept = [t for t in tasks if all(t.name in c for c in cut)]
        reports[is_shared] = (kept, aggregate(cut, kept, methods),
                              differences(cut, kept, methods, contenders=("atv", "atv_examples")))
    means, diffs = {}, {}
    for name, seen, is_shared in TEMPLATE_GROUPS:
        kept, summary, by_pair = reports[is_shared]
        group = "seen" if seen else "unseen"
        if not any(t.seen == seen for t in kept):
            continue
        for m, metrics in summary.items():
            for key, metric in (("first", "first_token"), ("em", "exact_match")):
                if not math.isnan(metrics[metric][group][0]):
                    means.setdefault(m, {}).setdefault(name, {})[key] = metrics[metric][group]
        for a, by_base in by_pair.items():
            for b, groups in by_base.items():
                diffs.setdefault(f"{a} - {b}", {})[name] = groups[group]
    return {"shared_templates": sorted(f"{t}[{i}]" for t, i in shared), "means": means, "differences": diffs}


def template_groups(split: dict) -> list[str]:
    """The TEMPLATE_GROUPS names that `by_template` found prompts for, in order."""
    return [g for g, _, _ in TEMPLATE_GROUPS if any(g in v for v in split["means"].values())]


def by_template_table(split: dict) -> str:
    """First-token accuracy and ATV's differences on own vs shared templates."""
    groups = template_groups(split)
    lines = ["| first-token (%) | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for m, by_group in split["means"].items():
        lines.append(f"| {m} | " + " | ".join(_cell(by_group[g]["first"], True) if g in by_group else "–"
                                             for g in groups) + " |")
    for pair, by_group in split["differences"].items():
        cells = []
        for g in groups:
            v = by_group.get(g, {}).get("first")
            cells.append("n/a" if v is None else f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]")
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate_open_rate(per_seed: list[dict], tasks: list[Task], seen: bool) -> float | None:
    gates = [g for r in per_seed for t in tasks if t.seen == seen and "atv" in r[t.name]
             for g in r[t.name]["atv"].get("gates", [])]
    return sum(g >= 0.5 for g in gates) / len(gates) if gates else None


def markdown_table(summary: dict, tasks: list[Task], metric: str) -> str:
    methods = list(summary)
    groups = [c for c in ("seen", "unseen") if any(t.seen == (c == "seen") for t in tasks)]
    cols = groups + [t.name for t in tasks]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    as_percent = metric != "mean_prompt_tokens"
    for m in methods:
        cells = [_cell(summary[m][metric][c], as_percent) for c in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(mean_std: tuple[float, float], as_percent: bool) -> str:
    """"mean±std", "mean" with one seed, "–" where the method was not scored."""
    f = 100 if as_percent else 1
    mean, std = mean_std
    if math.isnan(mean):
        return "–"
    return f"{f * mean:.1f}" if math.isnan(std) else f"{f * mean:.1f}±{f * std:.1f}"


def differences_table(diffs: dict) -> str:
    """ATV variants minus each baseline: mean difference [95% paired bootstrap interval], in points."""
    lines = ["| ATV variant - baseline | seen first-token | seen exact match | unseen first-token | unseen exact match |",
             "|---|---|---|---|---|"]
    for a, by_base in diffs.items():
        for b, groups in by_base.items():
            cells = []
            for group in ("seen", "unseen"):
                for key in ("first", "em"):
                    v = groups.get(group, {}).get(key)
                    cells.append("n/a" if v is None else f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]")
            lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generic_lines(per_seed: list[dict], seeds) -> list[str]:
    lines = []
    for seed, r in zip(seeds, per_seed):
        g = r.get("_generic")
        if g:
            open_ = sum(x >= 0.5 for x in g["gates"]) / len(g["gates"])
            lines.append(f"- seed {seed}: {g['n']} generic prompts, {g['tokens']} greedy tokens: ATV output identical "
                         f"to steering off on {100 * g['identical_atv']:.0f}% (ungated: "
                         f"{100 * g['identical_atv_nogate']:.0f}%); gate >= 0.5 on {100 * open_:.0f}%")
    return lines


def report(per_seed: list[dict], tasks: list[Task], methods, seeds) -> tuple[dict, str]:
    summary = aggregate(per_seed, tasks, methods)
    diffs = differences(per_seed, tasks, list(summary))
    gates = {"seen": gate_open_rate(per_seed, tasks, True), "unseen": gate_open_rate(per_seed, tasks, False)}
    split = by_template(per_seed, tasks, list(summary))
    text = ["## first-token accuracy (%)", markdown_table(summary, tasks, "first_token"),
            "", "## exact match (%)", markdown_table(summary, tasks, "exact_match"),
            "", "## target prompt tokens per query", markdown_table(summary, tasks, "mean_prompt_tokens"),
            "", "## ATV minus each baseline (points; paired bootstrap 95% interval over seeds x items)",
            differences_table(diffs),
            "", "## by template: the task's own vs one another task also uses",
            "Shared (the prompt does not say which task it is): " + ", ".join(split["shared_templates"]), "",
            by_template_table(split), "", "## gate and generic prompts"]
    text += [f"- served ATV gate >= 0.5 on {100 * v:.1f}% of {k} test queries" for k, v in gates.items() if v is not None]
    text += generic_lines(per_seed, seeds)
    generic = {str(s): {k: v for k, v in r["_generic"].items() if k != "identical"} for s, r in zip(seeds, per_seed)
               if "_generic" in r}
    return {"summary": summary, "differences": diffs, "by_template": split, "gate_open": gates,
            "generic": generic}, "\n".join(text) + "\n"


def plot(summary: dict, tasks: list[Task], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in ("seen", "unseen") if any(t.seen == (c == "seen") for t in tasks)] + [t.name for t in tasks]
    fig, ax = plt.subplots(figsize=(max(10, len(cols) * 0.9), 4.5))
    width = 0.8 / len(summary)
    for i, (method, s) in enumerate(summary.items()):
        means = [s["first_token"][c][0] for c in cols]
        stds = [0.0 if math.isnan(s["first_token"][c][1]) else s["first_token"][c][1] for c in cols]
        ax.bar([x + i * width for x in range(len(cols))], means, width, yerr=stds, label=method)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cols))], cols, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("first-token accuracy")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_by_template(split: dict, path: Path) -> None:
    """First-token accuracy per method on own vs shared templates (the bars of `by_template_table`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = template_groups(split)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(split["means"]), 1)
    for i, (method, by_group) in enumerate(split["means"].items()):
        cells = [by_group.get(g, {}).get("first", (float("nan"), float("nan"))) for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], [100 * m for m, _ in cells], width,
               yerr=[0.0 if math.isnan(sd) else 100 * sd for _, sd in cells], label=method)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups, fontsize=8)
    ax.set_ylabel("first-token accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("prompts under the task's own template vs a template another task also uses", fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def suite_and_files(args) -> list[Task]:
    """The built-in tasks (all, or --tasks) and/or the user's --task-file tasks; with only --task-file,
    the built-in suite is not needed."""
    files = [load_task_file(p, templates=args.template) for p in args.task_file]
    if args.task_file and not args.tasks:
        return unique_names(files)
    return unique_names(load_suite(names=args.tasks) + files)


def recipe(args) -> TrainConfig:
    """The preset, with the fields of --config (a JSON object of TrainConfig fields) replaced."""
    return with_config_file(PRESETS[args.preset], args.config)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atv eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/eval")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tasks", nargs="+", help="suite task names (default: all, or none with --task-file)")
    parser.add_argument("--task-file", nargs="+", default=[], help="JSONL files of {input, output} (+ optional template)")
    parser.add_argument("--template", help="prompt template for --task-file tasks, with {input} (default: the "
                                           "files' own \"template\" field, else \"Input: {input}\\nOutput:\")")
    parser.add_argument("--generator", help="use this checkpoint (or default: the shipped one) for the first seed instead of training one")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="recipe for trained generators")
    parser.add_argument("--config", help="JSON object of TrainConfig fields that override the preset's")
    parser.add_argument("--static-vectors", help="task_vectors.safetensors of `atv train --static` for the first seed")
    parser.add_argument("--k", type=int, default=5, help="demonstrations for ICL and for ATV with examples")
    parser.add_argument("--limit", type=int, help="test items per task")
    parser.add_argument("--rotate-templates", action="store_true",
                        help="one template per item, rotating (default: every item under every template)")
    parser.add_argument("--generic", help="JSONL of {kind, prompt} for the do-no-harm check, or 'none' "
                                          "(default: data/tasks/generic/eval.jsonl)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-per-task", type=int, default=80)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="target dtype: float32 (default, the reported figures), "
                                                          "bfloat16, or auto (bf16 where the CPU/GPU runs it natively)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tasks = suite_and_files(args)
    model, tokenizer = load_target(recipe(args).target, "auto", args.dtype)
    cached: dict = {}
    per_seed = [evaluate_seed(seed, args, model, tokenizer, tasks, cached) for seed in args.seeds]
    summary, text = report(per_seed, tasks, args.methods, args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"seeds": args.seeds, **summary}, indent=2))
    (out / "table.md").write_text(text)
    plot(summary["summary"], tasks, out / "eval.png")
    plot_by_template(summary["by_template"], out / "eval_by_template.png")
    print(text)
    return 0
