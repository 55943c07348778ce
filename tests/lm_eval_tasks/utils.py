"""Document loader for the lm-evaluation-harness tasks in this folder (their YAMLs name it as `custom_dataset`).

Reads a JSONL file that sits next to this module, so the tasks run from any working directory and never
reach a network (no `datasets` download, no hub). This module is imported by the harness, not by pytest.
"""
import json
from pathlib import Path


def load_docs(file: str, **_metadata):
    """-> DatasetDict with one split, "test", holding the records of `file` ({"input", "output"} per line)."""
    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / file).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
