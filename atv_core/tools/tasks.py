"""Task suite loading: prompts and short gold answers for training and evaluating the ATV generator.

A task is a folder `<root>/<name>/{train,valid,test}.jsonl` of `{"input": str, "output": str}`
records plus an entry in `<root>/suite.json` (built by `data/build_tasks.py`). A prompt is
`template.format(input=x)`; the continuation the target model must produce is `" " + output`
(outputs are stored without the leading space). A user's own task can be one JSONL file of
records, split deterministically 60/20/20 by a hash of each input; its prompt template comes from the
caller, else from the records' optional "template" field, else DEFAULT_TEMPLATE.

What it deliberately does not do: tokenize, batch, score or cache anything. Every call reads the
files again; there is no module state and nothing happens at import time.
"""
from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

from atv_core.engine.request import Example  # one demonstration: the same object a request's atv.examples holds

SPLITS = ("train", "valid", "test")
DEFAULT_TEMPLATE = "Input: {input}\nOutput:"
FILE_SPLIT_PERCENT = (60, 20, 20)  # train, valid, test shares for a single-file task
REBUILD_HINT = "build it with `python data/build_tasks.py` or point ATV_DATA_DIR at a built suite"


@dataclass(frozen=True)
class Task:
    """One task. `root` is its folder of split files, or a single JSONL file split by hash."""

    name: str
    kind: str
    seen: bool
    templates: tuple[str, ...]
    labels: tuple[str, ...] | None
    source: str
    licence: str
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "templates", tuple(self.templates))
        object.__setattr__(self, "labels", None if self.labels is None else tuple(self.labels))
        object.__setattr__(self, "root", Path(self.root))
        if not self.templates:
            raise ValueError(f"task {self.name!r} has no templates; give at least one containing {{input}}")
        for template in self.templates:
            check_template(template)

    def examples(self, split: str) -> list[Example]:
        """The examples of one split ('train', 'valid' or 'test'), in file order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        if self.root.is_file():
            return [e for e in read_jsonl(self.root) if split_of(e.input) == split]
        path = self.root / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; {REBUILD_HINT}")
        return read_jsonl(path)

    def required(self, split: str) -> list[Example]:
        """examples(split), refusing an empty split with the fix (a small task file can leave one empty)."""
        examples = self.examples(split)
        if not examples:
            why = (f": {self.root} is split 60/20/20 by a hash of each input, and none of its "
                   f"{len(read_jsonl(self.root))} records fell in {split}; add records") if self.root.is_file() else ""
            raise ValueError(f"task {self.name!r} has no {split} items{why}")
        return examples

    def prompt(self, example_input: str, template_index: int = 0) -> str:
        """The prompt text for one input under template `template_index`."""
        if not 0 <= template_index < len(self.templates):
            raise ValueError(f"template_index {template_index} out of range; task {self.name!r} "
                             f"has {len(self.templates)} templates (0..{len(self.templates) - 1})")
        return self.templates[template_index].format(input=example_input)

    def target(self, example: Example) -> str:
        """The continuation the model must produce after the prompt: a space, then the output."""
        return " " + example.output


def check_template(template: str) -> None:
    """Raise ValueError unless `template` has exactly one `{input}` field and no other field."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"template {template!r} is not a valid format string ({err}); "
                         "write literal braces as {{ and }}") from err
    if fields != ["input"]:
        raise ValueError(f"template {template!r} must contain {{input}} exactly once and no other "
                         f"{{field}} (found {fields}); write literal braces as {{{{ and }}}}")


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def unique_names(tasks: list[Task]) -> list[Task]:
    """Refuse two tasks of one name (a task file named like a suite task, or two files of one stem): their
    results, demonstrations and vectors are keyed by name and would silently merge."""
    seen: dict[str, Task] = {}
    for task in tasks:
        if task.name in seen:
            raise ValueError(f"two tasks are named {task.name!r} ({seen[task.name].root} and {task.root}); rename "
                             "the task file (its name is the file's stem)")
        seen[task.name] = task
    return tasks


def read_jsonl(path: Path) -> list[Example]:
    """Parse a JSONL file of {"input": str, "output": str} records, with line numbers in errors."""
    examples = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            examples.append(parse_record(line, f"{path}:{number}"))
    if not examples:
        raise ValueError(f"{path} holds no records; write one JSON object "
                         '{"input": "...", "output": "..."} per line')
    return examples


def file_templates(path: Path) -> tuple[str, ...]:
    """The distinct "template" fields of a JSONL task file, in file order (empty if none has one)."""
    found: list[str] = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        template = json.loads(line).get("template") if line.strip() else None
        if template is not None and not isinstance(template, str):
            raise ValueError(f'{path}:{number}: "template" must be a string containing {{input}}')
        if template and template not in found:
            found.append(template)
    return tuple(found)


def parse_record(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}); write one JSON object per line") from err
    if not isinstance(record, dict):
        raise ValueError(f'{where}: expected an object {{"input": ..., "output": ...}}, got {type(record).__name__}')
    missing = [k for k in ("input", "output") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; every record needs string "
                         '"input" and "output"')
    if not isinstance(record["input"], str) or not isinstance(record["output"], str):
        raise ValueError(f'{where}: "input" and "output" must be strings (quote numbers: "7", not 7)')
    if not record["output"].strip():
        raise ValueError(f'{where}: empty "output"; every record needs a non-empty answer')
    return Example(record["input"], record["output"].strip())


def split_of(text: str) -> str:
    """Deterministic split of an input by the first 8 bytes of its sha256 (60/20/20)."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100
    train, valid, _ = FILE_SPLIT_PERCENT
    return "train" if bucket < train else "valid" if bucket < train + valid else "test"


def default_data_dir() -> Path:
    """$ATV_DATA_DIR if set, else the repository's data/tasks next to this package."""
    override = os.environ.get("ATV_DATA_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "data" / "tasks"


def load_suite(root: Path | str | None = None, names=None, seen: bool | None = None) -> list[Task]:
    """Tasks of the suite at `root` (default: default_data_dir()), in suite order.

    `names` keeps only those tasks (unknown names raise ValueError); `seen` keeps only tasks whose
    `seen` flag equals it (True: tasks the generator trains on, False: held-out tasks).
    """
    root = Path(root) if root is not None else default_data_dir()
    suite_file = root / "suite.json"
    if not suite_file.exists():
        raise FileNotFoundError(f"{suite_file} not found; {REBUILD_HINT}")
    tasks = [task_from_entry(entry, root) for entry in json.loads(suite_file.read_text(encoding="utf-8"))]
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = sorted(set(names) - {t.name for t in tasks})
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; available: {[t.name for t in tasks]}")
        tasks = [t for t in tasks if t.name in names]
    if seen is not None:
        tasks = [t for t in tasks if t.seen == seen]
    return tasks


def task_from_entry(entry: dict, root: Path) -> Task:
    missing = [k for k in ("name", "kind", "seen", "templates") if k not in entry]
    if missing:
        raise ValueError(f"suite entry {entry.get('name', entry)!r} lacks {missing}; {REBUILD_HINT}")
    return Task(name=entry["name"], kind=entry["kind"], seen=bool(entry["seen"]),
                templates=tuple(entry["templates"]), labels=entry.get("labels"),
                source=entry.get("source", ""), licence=entry.get("licence", ""),
                root=root / entry["name"])


def load_task_file(path: Path | str, name: str | None = None, templates=None) -> Task:
    """A user task from one JSONL file of {"input", "output"} records, split 60/20/20 by input hash.

    `name` defaults to the file's stem. `templates` (a string or several) default to the distinct
    "template" fields of the records (in file order), else ("Input: {input}\\nOutput:",). The file is
    validated now (ValueError says what to fix); examples are read again on each `examples` call.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file; pass a JSONL file with one "
                                '{"input": "...", "output": "..."} per line')
    read_jsonl(path)
    if isinstance(templates, str):
        templates = (templates,)
    if templates is None:
        templates = file_templates(path) or None
    return Task(name=name or path.stem, kind="custom", seen=False,
                templates=tuple(templates) if templates is not None else (DEFAULT_TEMPLATE,),
                labels=None, source=str(path), licence="user-supplied", root=path)


def workload_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts of varied length drawn round-robin from the task suite's test splits (all tasks)."""
    tasks = load_suite()
    prompts = []
    i = 0
    while len(prompts) < n:
        task = tasks[i % len(tasks)]
        examples = task.examples("test")
        ex = examples[(i // len(tasks) + seed) % len(examples)]
        prompts.append(task.prompt(ex.input, i % len(task.templates)))
        i += 1
    return prompts
