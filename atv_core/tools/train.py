"""`atv train`: fit a generator (or the shared-vector control) on a task mixture, target frozen.

Loss: cross-entropy on the answer tokens only (" " + output + "\\n"), with the generator's vectors injected
by the same hooks, slot policy and input template the server uses. Validation each epoch, the best
checkpoint kept, a JSONL metrics log, resume from the run folder, a progress bar.
After training, the distance gate is fitted: centroids of the training queries' pooled embeddings and a
threshold below which the generator steps back (see generator.py).
This module does not evaluate methods against each other (evaluate.py does).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from atv_core.steering.checkpoint import load_generator, save_generator
from atv_core.steering.generator import ATVGenerator, GeneratorConfig
from atv_core.steering.injection import make_table, steering
from atv_core.steering.layers import find_decoder_layers
from atv_core.models import EMBEDDED_BACKBONE, EMBEDDED_TARGET, load_backbone, load_target, select_device
from atv_core.tools.tasks import Task, load_suite, load_task_file

log = logging.getLogger("atv.train")


@dataclass(frozen=True)
class TrainConfig:
    target: str = EMBEDDED_TARGET
    backbone: str = EMBEDDED_BACKBONE
    backbone_kind: str = "encoder"
    pooling: str | None = None
    rank: int | None = 64
    scale: float = 1.0
    layers: tuple[int, ...] | None = None
    position: str = "all"
    input_template: str = "{prompt}"
    train_backbone: bool = False
    gate: str = "distance"
    tasks: tuple[str, ...] | None = None        # suite task names (default: every seen task)
    task_files: tuple[str, ...] = ()            # extra user JSONL files
    max_per_task: int | None = 80
    epochs: int = 2
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 1e-5
    optimizer: str = "adamw"
    seed: int = 0
    device: str = "auto"
    shared: bool = False                        # the non-adaptive control: one learned vector for all queries
    out: str = "runs/atv"

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


PRESETS = {
    "default": TrainConfig(),
    # The paper's recipe; needs GPT-2 weights (a hub or a local copy): --backbone /path/to/gpt2
    "paper": TrainConfig(backbone="gpt2", backbone_kind="decoder", rank=None, scale=0.001, lr=5e-4,
                         weight_decay=1e-5, epochs=15, batch_size=1, optimizer="adam", gate="none",
                         train_backbone=True, max_per_task=90),
}


@dataclass
class Item:
    prompt: str
    target: str
    task: str


def training_items(tasks: list[Task], split: str, seed: int, max_per_task: int | None = None) -> list[Item]:
    """Every example under a template drawn per example (all templates appear across the set)."""
    rng = random.Random(seed)
    items = []
    for task in tasks:
        examples = task.examples(split)[:max_per_task] if max_per_task else task.examples(split)
        for i, ex in enumerate(examples):
            t = (i + rng.randrange(len(task.templates))) % len(task.templates)
            items.append(Item(task.prompt(ex.input, t), task.target(ex) + "\n", task.name))
    rng.shuffle(items)
    return items


def encode(tokenizer, prompts: list[str], targets: list[str], device) -> dict:
    """Right-padded prompt+answer ids, labels (-100 outside the answer), and the prompt/total lengths."""
    rows, prompt_lens = [], []
    for p, t in zip(prompts, targets):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        full = tokenizer(p + t, add_special_tokens=False)["input_ids"]
        if full[: len(p_ids)] != p_ids:  # tokenization merged across the boundary: encode the parts apart
            full = p_ids + tokenizer(t, add_special_tokens=False)["input_ids"]
        rows.append(full)
        prompt_lens.append(len(p_ids))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for b, (row, n) in enumerate(zip(rows, prompt_lens)):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
        labels[b, n: len(row)] = ids[b, n: len(row)]
    return {"ids": ids.to(device), "mask": mask.to(device), "labels": labels.to(device),
            "prompt_lens": prompt_lens, "total_lens": [len(r) for r in rows]}


def sequence_slots(prompt_lens: list[int], total_lens: list[int], policy: str, width: int) -> torch.Tensor:
    """Slot b + 1 on row b's steered tokens: all real tokens ("all"), or from the last prompt token on ("last")."""
    col = torch.arange(width).unsqueeze(0)
    p = torch.tensor(prompt_lens).unsqueeze(1)
    n = torch.tensor(total_lens).unsqueeze(1)
    start = torch.zeros_like(p) if policy == "all" else p - 1
    on = (col >= start) & (col < n)
    return on.long() * torch.arange(1, len(prompt_lens) + 1).unsqueeze(1)


def answer_loss(model, batch: dict, table: torch.Tensor | None, slots: torch.Tensor | None, layers) -> torch.Tensor:
    """Mean CE over answer tokens; logits computed only where there is a label."""
    with steering(model, table, slots, layers):
        hidden = model.base_model(input_ids=batch["ids"], attention_mask=batch["mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    where = labels != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][where]).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return nn.functional.cross_entropy(logits, labels[where])


class SharedVector(nn.Module):
    """The non-adaptive control: one learned vector per selected layer, the same for every query."""

    def __init__(self, n_layers: int, d: int):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(n_layers, d))

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.v.unsqueeze(0).expand(len(prompts), -1, -1)


class PooledCache:
    """Frozen backbone: each prompt's pooled embedding is computed once and reused across epochs."""

    def __init__(self, generator: ATVGenerator):
        self.generator, self.store = generator, {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(p for p in prompts if p not in self.store))
        if todo:
            with torch.no_grad():
                for p, q in zip(todo, self.generator.encode(todo)):
                    self.store[p] = q
        return torch.stack([self.store[p] for p in prompts])


def make_vectors_fn(generator: ATVGenerator, shared: SharedVector | None):
    cache = PooledCache(generator) if not generator.config.train_backbone else None

    def vectors(prompts: list[str]) -> torch.Tensor:
        if shared is not None:
            return shared(prompts) * generator.config.scale
        pooled = cache(prompts) if cache else generator.encode(prompts)
        return generator.expansion(pooled) * generator.config.scale
    return vectors


def evaluate_loss(model, tokenizer, items: list[Item], vectors_fn, layers, policy, batch_size, device) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            chunk = items[i: i + batch_size]
            batch = encode(tokenizer, [x.prompt for x in chunk], [x.target for x in chunk], device)
            table = make_table(vectors_fn([x.prompt for x in chunk]))
            slots = sequence_slots(batch["prompt_lens"], batch["total_lens"], policy, batch["ids"].shape[1])
            total += answer_loss(model, batch, table, slots.to(device), layers).item() * len(chunk)
            count += len(chunk)
    return total / max(count, 1)


def build_generator(cfg: TrainConfig, model, device) -> ATVGenerator:
    backbone, tokenizer = load_backbone(cfg.backbone, device)
    gcfg = GeneratorConfig(backbone=cfg.backbone, target=cfg.target, target_layers=len(find_decoder_layers(model)),
                           target_hidden=model.config.hidden_size, layers=cfg.layers, backbone_kind=cfg.backbone_kind,
                           pooling=cfg.pooling, rank=cfg.rank, scale=cfg.scale, position=cfg.position,
                           input_template=cfg.input_template, gate=cfg.gate, train_backbone=cfg.train_backbone,
                           recipe=cfg.to_json())
    return ATVGenerator(gcfg, backbone, tokenizer).to(device)


def select_tasks(cfg: TrainConfig) -> list[Task]:
    tasks = load_suite(names=cfg.tasks) if cfg.tasks else load_suite(seen=True)
    return tasks + [load_task_file(p) for p in cfg.task_files]


def train(cfg: TrainConfig, model=None, tokenizer=None) -> tuple[ATVGenerator, SharedVector | None, list[dict]]:
    """Train and return (generator, shared vector or None, per-epoch log). Writes cfg.out/."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = select_device(cfg.device)
    if model is None:
        model, tokenizer = load_target(cfg.target, cfg.device, "float32")
    model.requires_grad_(False).eval()
    generator = build_generator(cfg, model, device)
    shared = SharedVector(len(generator.config.selected_layers), generator.config.target_hidden).to(device) \
        if cfg.shared else None
    params = list(shared.parameters()) if shared else [p for p in generator.parameters() if p.requires_grad]
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    optimizer = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tasks = select_tasks(cfg)
    train_items = training_items(tasks, "train", cfg.seed, cfg.max_per_task)
    valid_items = training_items(tasks, "valid", cfg.seed + 1)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2))
    vectors_fn = make_vectors_fn(generator, shared)
    layers = generator.config.selected_layers
    state_path, start_epoch, best, history = out / "train_state.pt", 0, float("inf"), []
    if state_path.exists():  # resume (tensors only; weights_only refuses arbitrary pickles)
        state = torch.load(state_path, weights_only=True)
        (shared or generator).load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = int(state["epoch"]) + 1, float(state["best"])
        log.info("resumed from %s at epoch %d", state_path, start_epoch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    log_file = (out / "metrics.jsonl").open("a")
    steps_per_epoch = (len(train_items) + cfg.batch_size - 1) // cfg.batch_size
    for epoch in range(start_epoch, cfg.epochs):
        generator.train()
        random.Random(cfg.seed * 1000 + epoch).shuffle(train_items)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        running, t0 = 0.0, time.perf_counter()
        for step in bar:
            chunk = train_items[step * cfg.batch_size: (step + 1) * cfg.batch_size]
            batch = encode(tokenizer, [x.prompt for x in chunk], [x.target for x in chunk], device)
            slots = sequence_slots(batch["prompt_lens"], batch["total_lens"], generator.config.position,
                                   batch["ids"].shape[1]).to(device)
            with autocast:
                table = make_table(vectors_fn([x.prompt for x in chunk]))
                loss = answer_loss(model, batch, table, slots, layers)
            (loss / cfg.grad_accum).backward()
            if (step + 1) % cfg.grad_accum == 0 or step + 1 == steps_per_epoch:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.item()
            bar.set_postfix(loss=f"{running / (step + 1):.3f}")
        generator.eval()
        valid = evaluate_loss(model, tokenizer, valid_items, vectors_fn, layers, generator.config.position,
                              cfg.batch_size, device)
        record = {"epoch": epoch + 1, "train_loss": running / steps_per_epoch, "valid_loss": valid,
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        log.info("epoch %d: train %.4f valid %.4f (%.0fs)", epoch + 1, record["train_loss"], valid, record["seconds"])
        if valid < best:
            best = valid
            _save_best(generator, shared, out)
        trainable = (shared or generator).state_dict()
        torch.save({"model": {k: v for k, v in trainable.items() if not k.startswith("backbone.")},
                    "optimizer": optimizer.state_dict(), "epoch": epoch, "best": best}, state_path)
    log_file.close()
    _load_best(generator, shared, out)
    if shared is None and cfg.gate == "distance":
        fit_gate(generator, tasks)
        save_generator(generator, out / "generator", dtype=torch.float16)
    return generator, shared, history


def _save_best(generator, shared, out: Path) -> None:
    if shared is not None:
        from safetensors.torch import save_file
        save_file({"v": shared.v.detach().cpu().contiguous()}, str(out / "shared_vector.safetensors"))
    else:
        save_generator(generator, out / "generator", dtype=torch.float16)


def _load_best(generator, shared, out: Path) -> None:
    if shared is not None:
        from safetensors.torch import load_file
        shared.v.data.copy_(load_file(str(out / "shared_vector.safetensors"))["v"])
    else:
        best = load_generator(out / "generator", backbone=generator.backbone, tokenizer=generator.tokenizer,
                              device=generator.device)
        generator.expansion.load_state_dict(best.expansion.state_dict())


def fit_gate(generator: ATVGenerator, tasks: list[Task], quantile: float = 0.02, margin: float = 0.02) -> None:
    """Centroids = mean pooled embedding per (task, template) on train; threshold from validation queries:
    the `quantile` of their nearest-centroid cosine, minus a margin (so ~98% of in-distribution queries
    get gate ~1). The temperature makes the gate fall from ~0.9 to ~0.1 over about 4 margins."""
    centroids, valid_scores = [], []
    with torch.no_grad():
        for task in tasks:
            for t in range(len(task.templates)):
                prompts = [task.prompt(ex.input, t) for ex in task.examples("train")]
                centroids.append(nn.functional.normalize(generator.encode(prompts).mean(0), dim=-1))
        generator.centroids = torch.stack(centroids)
        for task in tasks:
            prompts = [task.prompt(ex.input, i % len(task.templates)) for i, ex in enumerate(task.examples("valid"))]
            q = nn.functional.normalize(generator.encode(prompts), dim=-1)
            valid_scores.append((q @ generator.centroids.T).max(-1).values)
    scores = torch.cat(valid_scores)
    threshold = float(torch.quantile(scores, quantile)) - margin
    config = replace(generator.config, gate_threshold=threshold, gate_temperature=margin / 2)
    generator.config = config
    log.info("gate: %d centroids, threshold %.4f", len(centroids), threshold)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atv train", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--config", help="JSON file of TrainConfig fields (overrides the preset)")
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name in ("tasks", "task_files", "layers"):
            parser.add_argument(f"--{f.name.replace('_', '-')}", nargs="+", default=None)
        elif f.type in ("bool",):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = PRESETS[args.preset]
    if args.config:
        cfg = replace(cfg, **json.loads(Path(args.config).read_text()))
    overrides = {}
    for name, f in TrainConfig.__dataclass_fields__.items():
        value = getattr(args, name)
        if value is None:
            continue
        default = getattr(TrainConfig(), name)
        if name == "layers":
            value = tuple(int(v) for v in value)
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(default, bool) or isinstance(value, bool):
            value = bool(value)
        elif name in ("rank", "max_per_task") and str(value).lower() == "none":
            value = None
        elif isinstance(default, int) or name in ("rank", "max_per_task"):
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        overrides[name] = value
    cfg = replace(cfg, **overrides)
    _, _, history = train(cfg)
    print(json.dumps({"out": cfg.out, "history": history}, indent=2))
    return 0
