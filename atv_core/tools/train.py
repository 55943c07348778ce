"""`atv train`: fit a generator (or a non-adaptive control) on a task mixture, target frozen.

Controls: `shared` = one learned vector for every query; `static` = one vector per task, trained directly
(all tasks in one run, each item steered by its own task's vector).

Loss: cross-entropy on the answer tokens only (" " + output + "\\n"), with the generator's vectors injected
by the same hooks, slot policy and input template the server uses. Validation each epoch, the best
checkpoint kept (early stopping with `patience`), a JSONL metrics log, resume from the run folder, a progress bar.
Options of the stronger recipe: the top `backbone_trainable_layers` backbone blocks fine-tuned; every item
under every template (`all_templates`); `examples_k` > 0 trains the generator to read k demonstrations of the
item's task (text, `ATVGenerator.format_input`) for a share `examples_prob` of the items.
Gates: "distance" is fitted after training (centroids of the training queries' pooled embeddings and a
threshold); "learned" is trained with the rest: generic prompts and negative kinds (data/tasks/generic) whose
target is the unsteered target's own greedy answer, plus a BCE term (task items 1, negatives 0).
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

from atv_core.steering.checkpoint import save_generator
from atv_core.steering.generator import ATVGenerator, GeneratorConfig
from atv_core.steering.injection import make_table, steering
from atv_core.steering.layers import find_decoder_layers
from atv_core.engine.request import chat_query
from atv_core.models import EMBEDDED_BACKBONE, EMBEDDED_TARGET, load_backbone, load_target, select_device
from atv_core.tools.tasks import DEFAULT_TEMPLATE, Task, load_suite, load_task_file, unique_names

log = logging.getLogger("atv.train")


@dataclass(frozen=True)
class TrainConfig:
    target: str = EMBEDDED_TARGET
    backbone: str = EMBEDDED_BACKBONE
    backbone_kind: str = "encoder"
    pooling: str | None = None
    rank: int | None = 64                       # None: full rank; 0: no direct expansion (bank only)
    bank_size: int = 0                          # K learned task vectors mixed per query (0: none)
    bank_temperature: float = 0.1               # softmax temperature of the bank's router
    bank_init: str | None = None                # task_vectors.safetensors of `atv train --static`: the bank starts
                                                # as the trained tasks' vectors (bank_size = number of tasks)
    consistency_weight: float = 0.0             # pull each task item's vector toward its task's running mean
    scale: float = 1.0
    layers: tuple[int, ...] | None = None
    position: str = "all"
    input_template: str = "{prompt}"
    train_backbone: bool = False
    gate: str = "distance"                      # "distance" | "learned" | "none"
    backbone_trainable_layers: int = 0          # fine-tune the top N backbone blocks
    backbone_layers: int | None = None          # keep the first N backbone blocks only (cheaper generator)
    examples_k: int = 0                         # train to read up to k demonstrations (0: never)
    examples_prob: float = 0.5                  # share of items whose generator input carries demonstrations
    examples_plain_prob: float = 0.5            # of those, share whose prompt is the task-agnostic "Input:/Output:"
    all_templates: bool = False                 # every item under every template (else one drawn per item)
    negatives: str | None = None                # JSONL of {"kind", "prompt"} for the learned gate (default: the suite's)
    negative_tokens: int = 16                   # length of the unsteered answers used as negatives' targets
    gate_loss_weight: float = 1.0
    gate_open: float = 0.5                      # stored in the checkpoint: serving closes gates below it
    patience: int | None = None                 # stop after this many epochs without a better validation loss
    backbone_lr: float = 1e-4                   # learning rate of fine-tuned backbone blocks
    gate_lr: float = 1e-2                       # learning rate of the learned gate's head
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
    static: bool = False                        # the per-task control: one learned vector per task
    out: str = "runs/atv"

    def __post_init__(self):
        """The settings the generator's own config does not check (GeneratorConfig checks the rest)."""
        at_least_1 = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                      "max_per_task": self.max_per_task or 1, "patience": self.patience or 1}
        bad = [f"{k} ({v})" for k, v in at_least_1.items() if not isinstance(v, int) or v < 1]
        bad += [f"{k} ({v})" for k, v in (("lr", self.lr), ("backbone_lr", self.backbone_lr), ("gate_lr", self.gate_lr))
                if not v > 0]
        bad += [f"{k} ({v})" for k, v in (("examples_prob", self.examples_prob),
                                          ("examples_plain_prob", self.examples_plain_prob)) if not 0 <= v <= 1]
        if self.examples_k < 0:
            bad.append(f"examples_k ({self.examples_k})")
        if bad:
            raise ValueError(f"training settings out of range: {', '.join(bad)}; counts must be >= 1 (max_per_task "
                             "and patience may be none), learning rates > 0, shares in [0, 1], examples_k >= 0")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be adam or adamw, got {self.optimizer!r}")

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def with_config_file(cfg: TrainConfig, path: str | None) -> TrainConfig:
    """cfg with the fields of a JSON file of TrainConfig fields (`--config F`) replaced."""
    if not path:
        return cfg
    fields = json.loads(Path(path).read_text())
    unknown = set(fields) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"--config {path}: unknown TrainConfig fields {sorted(unknown)}")
    return replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


PRESETS = {
    "default": TrainConfig(),
    # Issue 13's recipe: top 2 backbone blocks tuned, reads up to 5 demonstrations, learned do-no-harm gate
    # served closed below 0.9 (every validation task query of three seeds had >= 0.98), early stopping on
    # validation loss.
    "strong": TrainConfig(gate="learned", backbone_trainable_layers=2, examples_k=5, epochs=3, patience=1,
                          gate_open=0.9),
    # The paper's recipe; needs GPT-2 weights (a hub or a local copy): --backbone /path/to/gpt2
    "paper": TrainConfig(backbone="gpt2", backbone_kind="decoder", rank=None, scale=0.001, lr=5e-4,
                         weight_decay=1e-5, epochs=15, batch_size=1, optimizer="adam", gate="none",
                         train_backbone=True, max_per_task=90),
}


@dataclass
class Item:
    prompt: str                 # what the target reads
    target: str                 # the continuation it is trained to produce
    task: str
    gen_input: str = ""         # what the generator reads (default: the prompt)
    gate_label: float = 1.0     # 1: steer (a task item), 0: do no harm (a negative)
    input: str = ""             # the task example's input (to keep an item out of its own demonstrations)

    def __post_init__(self):
        self.gen_input = self.gen_input or self.prompt


def training_items(tasks: list[Task], split: str, seed: int, max_per_task: int | None = None,
                   all_templates: bool = False) -> list[Item]:
    """Every example under a template drawn per example (all templates appear across the set), or under
    every template when `all_templates`."""
    rng = random.Random(seed)
    items = []
    for task in tasks:
        examples = task.examples(split)[:max_per_task] if max_per_task else task.examples(split)
        for i, ex in enumerate(examples):
            chosen = range(len(task.templates)) if all_templates else \
                [(i + rng.randrange(len(task.templates))) % len(task.templates)]
            items += [Item(task.prompt(ex.input, t), task.target(ex) + "\n", task.name, input=ex.input) for t in chosen]
    rng.shuffle(items)
    return items


def with_examples(items: list[Item], tasks: list[Task], generator: ATVGenerator, k: int, share: float,
                  seed: int, plain: float = 0.0) -> list[Item]:
    """A share of the items read 1..k demonstrations of their task (train split, never the item itself).
    Of those, a share `plain` gets the task-agnostic prompt "Input: x\nOutput:", so that only the
    demonstrations say what the task is."""
    rng = random.Random(seed)
    pools = {t.name: t.examples("train") for t in tasks}
    out = []
    for item in items:
        if k > 0 and rng.random() < share:
            pool = [e for e in pools[item.task] if e.input != item.input]
            demos = rng.sample(pool, min(len(pool), rng.randint(1, k)))
            if item.input and rng.random() < plain:
                item = replace(item, prompt=DEFAULT_TEMPLATE.format(input=item.input), gen_input="")
            item = replace(item, gen_input=generator.format_input(item.prompt, demos))
        out.append(item)
    return out


def default_negatives() -> Path:
    from atv_core.tools.tasks import default_data_dir
    return default_data_dir() / "generic" / "train.jsonl"


def read_prompts(path: Path | str) -> list[dict]:
    """JSONL of {"kind": str, "prompt": str} (generic prompts and negative kinds)."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [i for i, r in enumerate(rows, 1) if not isinstance(r, dict) or not isinstance(r.get("prompt"), str)]
    if bad or not rows:
        raise ValueError(f"{path}: lines {bad[:5]} lack a string \"prompt\"; write one {{\"kind\", \"prompt\"}} per line")
    return rows


def chat_prompt(tokenizer, text: str) -> str:
    """A user message as the server's chat endpoint sends it to the target (its chat template), or the text
    (what the generator reads of it: chat_query)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def unsteered_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """The target's own greedy continuations (no steering), the do-no-harm targets."""
    answers = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i: i + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def negative_rows(path, split: str) -> list[dict]:
    """The negatives' prompts of one split: every 5th is validation."""
    return [r for i, r in enumerate(read_prompts(path)) if (i % 5 == 4) == (split == "valid")]


def negative_items(path, model, tokenizer, split: str, max_new_tokens: int, seed: int) -> list[Item]:
    """Negatives (gate label 0) of one split (every 5th prompt is validation), sent as the chat endpoint sends
    them: the target reads the chat-templated prompt and its target is the unsteered answer to it; the generator
    reads what the server's generator reads of a chat (chat_query: the user text, no template)."""
    rows = negative_rows(path, split)
    prompts = [chat_prompt(tokenizer, r["prompt"]) for r in rows]
    answers = unsteered_answers(model, tokenizer, prompts, max_new_tokens)
    items = [Item(p, a, "negative:" + r.get("kind", "generic"), gen_input=chat_query([("user", r["prompt"])]),
                  gate_label=0.0)
             for p, a, r in zip(prompts, answers, rows) if a.strip()]
    random.Random(seed).shuffle(items)
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

    def forward(self, items: list) -> torch.Tensor:
        return self.v.unsqueeze(0).expand(len(items), -1, -1)

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return {"v": self.v.detach().cpu().contiguous()}


class TaskVectors(nn.Module):
    """The per-task control: one learned vector per selected layer and task; item i uses its task's row."""

    def __init__(self, n_layers: int, d: int, tasks: list[str]):
        super().__init__()
        self.tasks = list(tasks)
        self.index = {name: i for i, name in enumerate(self.tasks)}
        self.v = nn.Parameter(torch.zeros(len(self.tasks), n_layers, d))

    def forward(self, items: list) -> torch.Tensor:
        return self.v[torch.tensor([self.index[x.task] for x in items], device=self.v.device)]

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return {f"task.{name}": self.v[i].detach().cpu().contiguous() for i, name in enumerate(self.tasks)}


def control_file(cfg_or_shared) -> str:
    static = isinstance(cfg_or_shared, TaskVectors) or getattr(cfg_or_shared, "static", False)
    return "task_vectors.safetensors" if static else "shared_vector.safetensors"


def load_task_vectors(path: Path | str) -> dict[str, torch.Tensor]:
    """task name -> [L_sel, d] from a `static` run's task_vectors.safetensors."""
    from safetensors.torch import load_file
    return {k.split(".", 1)[1]: v for k, v in load_file(str(path)).items() if k.startswith("task.")}


class PooledCache:
    """Frozen backbone: each input's pooled embedding is computed once and reused across epochs."""

    def __init__(self, generator: ATVGenerator):
        self.generator, self.store = generator, {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(p for p in texts if p not in self.store))
        if todo:
            with torch.no_grad():
                for p, q in zip(todo, self.generator.encode(todo)):
                    self.store[p] = q
        return torch.stack([self.store[p] for p in texts])


def make_vectors_fn(generator: ATVGenerator, shared: SharedVector | None):
    """items -> (vectors [B, L_sel, d] as served: lambda * gate * v, learned-gate logits [B] or None)."""
    cache = PooledCache(generator) if not generator.trains_backbone else None

    def vectors(items: list[Item]):
        texts = [x.gen_input for x in items]
        if shared is not None:
            return shared(items) * generator.config.scale, None
        pooled = cache(texts) if cache else generator.encode(texts)
        v = generator.expansion(pooled) * generator.config.scale
        if generator.gate_head is None:
            return v, None
        logits = generator.gate_head.logits(pooled)
        return v * torch.sigmoid(logits).view(-1, 1, 1), logits
    return vectors


class TaskConsistency:
    """A training-only regulariser: weight x the mean over the batch's task items (negatives excluded) of

        sum over layers |v_i[l] - m_t[l]|^2 / L_sel

    where m_t is a running mean (momentum 0.9, no gradient) of task t's vectors. Measured motivation: the mean of
    the generator's own vectors per task scored 4.4 points above the per-query vectors on seen tasks (3 seeds),
    so the per-query spread within a task cost accuracy (for the shipped generator on training prompts, 2.3 per
    layer). Serving is unchanged: the generator reads only the query (and demonstrations); the task name is used
    in training only. (A version relative to |v|^2 + |m|^2 blew up: at the start every vector is zero.)"""

    def __init__(self, weight: float, momentum: float = 0.9):
        self.weight, self.momentum = weight, momentum
        self.means: dict[str, torch.Tensor] = {}

    def __call__(self, items: list[Item], vectors: torch.Tensor) -> torch.Tensor:
        terms = []
        for task in dict.fromkeys(x.task for x in items if x.gate_label == 1.0):
            rows = vectors[[i for i, x in enumerate(items) if x.task == task and x.gate_label == 1.0]]   # [n, L, d]
            batch_mean = rows.mean(0).detach()
            mean = self.means.get(task, batch_mean)
            terms.append((rows - mean).pow(2).sum((1, 2)) / rows.shape[1])
            self.means[task] = self.momentum * mean + (1 - self.momentum) * batch_mean
        if not terms:
            return vectors.new_zeros(())
        return self.weight * torch.cat(terms).mean()


def item_loss(model, tokenizer, chunk: list[Item], vectors_fn, layers, policy, device, gate_weight: float,
              regulariser=None):
    """Answer CE with the items' vectors injected, plus the learned gate's BCE (task 1, negative 0), plus
    regulariser(chunk, vectors) when given (training only: validation losses stay comparable across recipes)."""
    batch = encode(tokenizer, [x.prompt for x in chunk], [x.target for x in chunk], device)
    slots = sequence_slots(batch["prompt_lens"], batch["total_lens"], policy, batch["ids"].shape[1]).to(device)
    vectors, logits = vectors_fn(chunk)
    loss = answer_loss(model, batch, make_table(vectors), slots, layers)
    if regulariser is not None:
        loss = loss + regulariser(chunk, vectors)
    if logits is not None and gate_weight:
        labels = torch.tensor([x.gate_label for x in chunk], device=logits.device)
        loss = loss + gate_weight * nn.functional.binary_cross_entropy_with_logits(logits, labels)
    return loss


def evaluate_loss(model, tokenizer, items: list[Item], vectors_fn, layers, policy, batch_size, device,
                  gate_weight: float = 0.0) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            chunk = items[i: i + batch_size]
            total += item_loss(model, tokenizer, chunk, vectors_fn, layers, policy, device, gate_weight).item() * len(chunk)
            count += len(chunk)
    return total / max(count, 1)


def build_generator(cfg: TrainConfig, model, device) -> ATVGenerator:
    backbone, tokenizer = load_backbone(cfg.backbone, device)
    gcfg = GeneratorConfig(backbone=cfg.backbone, target=cfg.target, target_layers=len(find_decoder_layers(model)),
                           target_hidden=model.config.hidden_size, layers=cfg.layers, backbone_kind=cfg.backbone_kind,
                           pooling=cfg.pooling, rank=cfg.rank, bank_size=cfg.bank_size,
                           bank_temperature=cfg.bank_temperature, scale=cfg.scale,
                           position=cfg.position,
                           input_template=cfg.input_template, gate=cfg.gate, gate_open=cfg.gate_open,
                           train_backbone=cfg.train_backbone,
                           backbone_trainable_layers=cfg.backbone_trainable_layers, max_examples=cfg.examples_k,
                           backbone_layers=cfg.backbone_layers,
                           recipe=cfg.to_json())
    return ATVGenerator(gcfg, backbone, tokenizer).to(device)


def init_bank(generator: ATVGenerator, path: str, names: list[str]) -> None:
    """Start the bank as the per-task vectors of a static run (row i = task names[i]; trained tasks only)."""
    vectors = load_task_vectors(path)
    missing = [n for n in names if n not in vectors]
    if missing:
        raise ValueError(f"bank_init {path} has no vector for the trained tasks {missing}; train it with "
                         f"`atv train --static` on the same tasks")
    bank = generator.expansion.bank
    if bank is None or bank.shape[0] != len(names):
        raise ValueError(f"bank_init needs bank_size = the number of trained tasks ({len(names)}), got "
                         f"{0 if bank is None else bank.shape[0]}")
    with torch.no_grad():
        bank.copy_(torch.stack([vectors[n] for n in names]).flatten(1).to(bank) / generator.config.scale)


def select_tasks(cfg: TrainConfig) -> list[Task]:
    """cfg.tasks names suite tasks; None = every seen task; () = none (only cfg.task_files). Refuses two tasks
    of one name, and a task without training items."""
    tasks = load_suite(names=cfg.tasks) if cfg.tasks else load_suite(seen=True) if cfg.tasks is None else []
    tasks = unique_names(tasks + [load_task_file(p) for p in cfg.task_files])
    for task in tasks:
        task.required("train")
    return tasks


def param_groups(cfg: TrainConfig, generator: ATVGenerator, shared: SharedVector | None) -> list[dict]:
    if shared is not None:
        return [{"params": list(shared.parameters())}]
    backbone = [p for p in generator.backbone.parameters() if p.requires_grad]
    gate = list(generator.gate_head.parameters()) if generator.gate_head is not None else []
    head = [p for n, p in generator.named_parameters() if p.requires_grad and n.startswith("expansion.")]
    lr = cfg.lr if cfg.train_backbone else cfg.backbone_lr
    return [{"params": head}] + ([{"params": backbone, "lr": lr}] if backbone else []) + \
        ([{"params": gate, "lr": cfg.gate_lr}] if gate else [])


def make_items(cfg: TrainConfig, tasks: list[Task], generator, model, tokenizer, split: str) -> list[Item]:
    """Task items (with demonstrations for a share when examples_k) and, for a learned gate, negatives."""
    seed = cfg.seed if split == "train" else cfg.seed + 1
    items = training_items(tasks, split, seed, cfg.max_per_task if split == "train" else None, cfg.all_templates)
    items = with_examples(items, tasks, generator, cfg.examples_k, cfg.examples_prob, seed, cfg.examples_plain_prob)
    if cfg.gate == "learned" and not (cfg.shared or cfg.static):
        items += negative_items(cfg.negatives or default_negatives(), model, tokenizer, split,
                                cfg.negative_tokens, seed)
        random.Random(seed).shuffle(items)
    return items


def train(cfg: TrainConfig, model=None, tokenizer=None) -> tuple[ATVGenerator, SharedVector | None, list[dict]]:
    """Train and return (generator, shared vector or None, per-epoch log). Writes cfg.out/."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = select_device(cfg.device)
    tasks = select_tasks(cfg)   # before loading anything: a bad task file is refused at once
    if model is None:
        model, tokenizer = load_target(cfg.target, cfg.device, "float32")
    model.requires_grad_(False).eval()
    if cfg.bank_init and not cfg.bank_size:
        cfg = replace(cfg, bank_size=len(tasks))
    generator = build_generator(cfg, model, device)
    if cfg.bank_init and not (cfg.shared or cfg.static):
        init_bank(generator, cfg.bank_init, [t.name for t in tasks])
    n_layers, d = len(generator.config.selected_layers), generator.config.target_hidden
    shared = TaskVectors(n_layers, d, [t.name for t in tasks]).to(device) if cfg.static else \
        SharedVector(n_layers, d).to(device) if cfg.shared else None
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    optimizer = opt_cls(param_groups(cfg, generator, shared), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_items = make_items(cfg, tasks, generator, model, tokenizer, "train")
    valid_items = make_items(cfg, tasks, generator, model, tokenizer, "valid")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2))
    vectors_fn = make_vectors_fn(generator, shared)
    layers, policy = generator.config.selected_layers, generator.config.position
    gate_weight = cfg.gate_loss_weight if cfg.gate == "learned" else 0.0
    regulariser = TaskConsistency(cfg.consistency_weight) if cfg.consistency_weight and shared is None else None
    state_path, start_epoch, best, history, stale = out / "train_state.pt", 0, float("inf"), [], 0
    if state_path.exists():  # resume (tensors only; weights_only refuses arbitrary pickles)
        state = torch.load(state_path, weights_only=True)
        (shared or generator).load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, stale = int(state["epoch"]) + 1, float(state["best"]), int(state.get("stale", 0))
        log.info("resumed from %s at epoch %d", state_path, start_epoch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    log_file = (out / "metrics.jsonl").open("a")
    steps_per_epoch = (len(train_items) + cfg.batch_size - 1) // cfg.batch_size
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.patience is not None and stale >= cfg.patience:
            log.info("early stop: no better validation loss for %d epochs", stale)
            break
        generator.train()
        random.Random(cfg.seed * 1000 + epoch).shuffle(train_items)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        running, t0 = 0.0, time.perf_counter()
        for step in bar:
            chunk = train_items[step * cfg.batch_size: (step + 1) * cfg.batch_size]
            with autocast:
                loss = item_loss(model, tokenizer, chunk, vectors_fn, layers, policy, device, gate_weight, regulariser)
            (loss / cfg.grad_accum).backward()
            if (step + 1) % cfg.grad_accum == 0 or step + 1 == steps_per_epoch:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.item()
            bar.set_postfix(loss=f"{running / (step + 1):.3f}")
        generator.eval()
        valid = evaluate_loss(model, tokenizer, valid_items, vectors_fn, layers, policy, cfg.batch_size, device,
                              gate_weight)
        record = {"epoch": epoch + 1, "train_loss": running / steps_per_epoch, "valid_loss": valid,
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        log.info("epoch %d: train %.4f valid %.4f (%.0fs)", epoch + 1, record["train_loss"], valid, record["seconds"])
        stale = 0 if valid < best else stale + 1
        if valid < best:
            best = valid
            _save_best(generator, shared, out)
        trainable = (shared or generator).state_dict()
        kept = shared.state_dict() if shared else generator.trainable_state_dict()
        torch.save({"model": {k: v for k, v in trainable.items() if k in kept},
                    "optimizer": optimizer.state_dict(), "epoch": epoch, "best": best, "stale": stale}, state_path)
    log_file.close()
    _load_best(generator, shared, out)
    if shared is None and cfg.gate == "distance":
        fit_gate(generator, tasks)
        save_generator(generator, out / "generator", dtype=torch.float16)
    return generator, shared, history


def _save_best(generator, shared, out: Path) -> None:
    if shared is not None:
        from safetensors.torch import save_file
        save_file(shared.state_to_save(), str(out / control_file(shared)))
    else:
        save_generator(generator, out / "generator", dtype=torch.float16)


def _load_best(generator, shared, out: Path) -> None:
    from safetensors.torch import load_file
    if isinstance(shared, TaskVectors):
        saved = load_task_vectors(out / control_file(shared))
        shared.v.data.copy_(torch.stack([saved[name] for name in shared.tasks]))
    elif shared is not None:
        shared.v.data.copy_(load_file(str(out / control_file(shared)))["v"])
    else:
        from atv_core.steering.checkpoint import WEIGHTS_FILE
        state = load_file(str(out / "generator" / WEIGHTS_FILE))
        own = generator.state_dict()
        generator.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, strict=False)


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
    parser = argparse.ArgumentParser(prog="atv train", description=__doc__.split("\n\n")[0])
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
    cfg = with_config_file(PRESETS[args.preset], args.config)
    overrides = {}
    for name, f in TrainConfig.__dataclass_fields__.items():
        value = getattr(args, name)
        if value is None:
            continue
        default = getattr(TrainConfig(), name)
        try:
            overrides[name] = _flag_value(name, value, default)
        except ValueError:
            raise ValueError(f"--{name.replace('_', '-')}: expected {type(default).__name__}, got {value!r}") from None
    cfg = replace(cfg, **overrides)
    _, _, history = train(cfg)
    print(json.dumps({"out": cfg.out, "history": history}, indent=2))
    return 0


def _flag_value(name: str, value, default):
    """A flag's text as the TrainConfig field's type (ValueError when it is not one)."""
    if name == "layers":
        return tuple(int(v) for v in value)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(default, bool) or isinstance(value, bool):
        return bool(value)
    if name in ("rank", "max_per_task", "patience", "negatives", "backbone_layers", "bank_init") and \
            str(value).lower() == "none":
        return None
    if isinstance(default, int) or name in ("rank", "max_per_task", "patience", "backbone_layers"):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value
