"""The learned gate on validation data: what a serving cut (`gate_open`) below which the gate closes would cost.

    python bench/eval/served_chat/gate_cut.py SEED=GENERATOR_DIR [SEED=GENERATOR_DIR ...]

For each generator: its gates on the validation split of the seen tasks' items (every item under every template,
as `atv train --all-templates` builds them with seed + 1) and on the validation negatives (every 5th generic
prompt of the training negatives, as the server's chat endpoint gives them to the generator). Test data is not
read. Prints the quantiles of the task gates and the negatives' gates at or above 0.5.
"""
from __future__ import annotations

import sys

import torch

from atv_core.engine.request import chat_query
from atv_core.steering.checkpoint import load_generator
from atv_core.tools.tasks import load_suite
from atv_core.tools.train import default_negatives, negative_rows, training_items


def gates(generator, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([generator(texts[i:i + 64]).gates.float().flatten() for i in range(0, len(texts), 64)])


def main(argv: list[str]) -> None:
    tasks = load_suite(seen=True)
    negatives = negative_rows(default_negatives(), "valid")
    for spec in argv:
        seed, path = spec.split("=", 1)
        generator = load_generator(path)
        items = training_items(tasks, "valid", int(seed) + 1, None, True)
        task = gates(generator, [it.gen_input for it in items])
        negative = gates(generator, [chat_query([("user", r["prompt"])]) for r in negatives])
        q = torch.quantile(task, torch.tensor([0.001, 0.01, 0.05])).tolist()
        print(f"seed {seed} ({path}): {len(task)} validation task queries: min {task.min():.3f}, quantiles "
              f"0.1 % {q[0]:.3f}, 1 % {q[1]:.3f}, 5 % {q[2]:.3f}; {len(negative)} validation negatives: "
              f"{int((negative >= 0.5).sum())} at or above 0.5 {sorted(round(x, 3) for x in negative.tolist() if x >= 0.5)}"
              f", {int((negative >= 0.9).sum())} at or above 0.9")


if __name__ == "__main__":
    main(sys.argv[1:])
