"""Distil a generator into one with fewer backbone blocks (a cheaper generator for TTFT; an experiment).

Usage: python bench/distill_generator.py [--teacher atv_core/default_generator] [--blocks 3] [--out DIR]

The student keeps the teacher's first N backbone blocks (all of them fine-tuned) and the teacher's expansion and
gate heads (frozen), and learns to give the teacher's vectors and gate logits for the teacher's own training
inputs: the seen tasks' prompts (some with 1..k demonstrations, as in training) and the generic prompts that
train the gate. Loss: |v_s - v_t|^2 / |v_t|^2 (vectors before gating) + (gate logit_s - gate logit_t)^2.
Writes a normal generator checkpoint (`backbone_layers` N) that `atv serve --generator` and `atv eval` read.
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from atv_core.models import DEFAULT_GENERATOR_DIR, load_backbone, load_tokenizer
from atv_core.steering.checkpoint import load_generator, save_generator
from atv_core.steering.generator import ATVGenerator
from atv_core.tools.tasks import load_suite
from atv_core.tools.train import chat_prompt, default_negatives, read_prompts, training_items, with_examples


def inputs(teacher: ATVGenerator, target_tokenizer, split: str, seed: int) -> list[str]:
    recipe = teacher.config.recipe
    tasks = load_suite(names=recipe["tasks"]) if recipe.get("tasks") else load_suite(seen=True)
    items = training_items(tasks, split, seed, recipe.get("max_per_task") if split == "train" else None)
    items = with_examples(items, tasks, teacher, recipe.get("examples_k", 0), recipe.get("examples_prob", 0.5), seed,
                          recipe.get("examples_plain_prob", 0.5))
    rows = [r for i, r in enumerate(read_prompts(default_negatives())) if (i % 5 == 4) == (split == "valid")]
    return [x.gen_input for x in items] + [chat_prompt(target_tokenizer, r["prompt"]) for r in rows]


def heads(generator: ATVGenerator, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    pooled = generator.encode(texts)
    return generator.expansion(pooled), generator.gate_head.logits(pooled)


def relative_error(v, target_v) -> torch.Tensor:
    """Mean over inputs of |v - v_t|^2 / |v_t|^2."""
    return ((v - target_v).pow(2).sum((1, 2)) / target_v.pow(2).sum((1, 2)).clamp(min=1e-6)).mean()


def loss_of(v, g, target_v, target_g) -> torch.Tensor:
    return relative_error(v, target_v) + (g - target_g).pow(2).mean()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=str(DEFAULT_GENERATOR_DIR))
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/distill")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    teacher = load_generator(args.teacher)
    if teacher.gate_head is None:
        raise ValueError("this script distils generators with a learned gate")
    config = replace(teacher.config, backbone_layers=args.blocks, backbone_trainable_layers=args.blocks,
                     recipe={**teacher.config.recipe, "distilled_from": args.teacher, "distill": vars(args)})
    backbone, tokenizer = load_backbone(config.backbone)
    student = ATVGenerator(config, backbone, tokenizer)
    student.expansion.load_state_dict(teacher.expansion.state_dict())
    student.gate_head.load_state_dict(teacher.gate_head.state_dict())
    student.expansion.requires_grad_(False)
    student.gate_head.requires_grad_(False)
    target_tokenizer = load_tokenizer(teacher.config.target)      # negatives carry the target's chat template
    train = inputs(teacher, target_tokenizer, "train", args.seed)
    valid = inputs(teacher, target_tokenizer, "valid", args.seed + 1)
    with torch.no_grad():
        tv, tg = heads(teacher, train)
        vv, vg = heads(teacher, valid)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    best, t0 = float("inf"), time.perf_counter()
    for epoch in range(args.epochs):
        student.train()
        order = list(range(len(train)))
        random.Random(args.seed * 1000 + epoch).shuffle(order)
        for i in range(0, len(order), args.batch_size):
            idx = order[i: i + args.batch_size]
            loss = loss_of(*heads(student, [train[j] for j in idx]), tv[idx], tg[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        student.eval()
        with torch.no_grad():
            v, g = heads(student, valid)
        valid_loss, rel = loss_of(v, g, vv, vg).item(), relative_error(v, vv).item()
        agree = ((g > 0) == (vg > 0)).float().mean().item()
        print(f"epoch {epoch + 1}: valid {valid_loss:.4f} (relative vector error {rel:.4f}, gate side agrees on "
              f"{100 * agree:.1f} %) ({time.perf_counter() - t0:.0f} s)", flush=True)
        if valid_loss < best:
            best = valid_loss
            save_generator(student, Path(args.out) / "generator", dtype=torch.float16)
    print(f"best valid {best:.4f}; {len(train)} train and {len(valid)} valid inputs; wrote {args.out}/generator")


if __name__ == "__main__":
    main()
