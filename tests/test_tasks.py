"""Tests of the committed task suite (data/tasks) and of atv_core.tools.tasks; no model, no download."""
import json
from collections import Counter
from pathlib import Path

import pytest

from atv_core.tools.tasks import (Example, Task, default_data_dir, load_suite, load_task_file, split_of)

ROOT = Path(__file__).resolve().parents[1]

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def suite():
    return load_suite()


def test_suite_has_enough_seen_and_unseen_tasks(suite):
    seen = [t for t in suite if t.seen]
    unseen = [t for t in suite if not t.seen]
    assert len(seen) >= 12 and len(unseen) >= 4
    assert len({t.kind for t in seen}) >= 4
    assert len({t.name for t in suite}) == len(suite)


def test_seen_filter_and_names(suite):
    assert [t.name for t in load_suite(seen=False)] == [t.name for t in suite if not t.seen]
    picked = load_suite(names=["antonym", "sentiment_rt"])
    assert {t.name for t in picked} == {"antonym", "sentiment_rt"}
    with pytest.raises(ValueError, match="unknown task"):
        load_suite(names=["no_such_task"])


def test_templates_have_input_once(suite):
    for task in suite:
        assert len(task.templates) >= 2, task.name
        for template in task.templates:
            assert template.count("{input}") == 1, (task.name, template)


def test_counts_match_files_and_sizes(suite):
    entries = {e["name"]: e for e in json.loads((default_data_dir() / "suite.json").read_text())}
    for task in suite:
        counts = {s: len(task.examples(s)) for s in SPLITS}
        assert counts == entries[task.name]["counts"], task.name
        assert counts["test"] >= 40 and counts["train"] >= counts["test"], task.name


def test_splits_are_disjoint(suite):
    for task in suite:
        inputs = {s: {e.input for e in task.examples(s)} for s in SPLITS}
        assert not inputs["train"] & inputs["test"], task.name
        assert not inputs["train"] & inputs["valid"], task.name
        assert not inputs["valid"] & inputs["test"], task.name


def test_outputs_are_short_and_in_labels(suite):
    for task in suite:
        for split in SPLITS:
            for example in task.examples(split):
                assert example.output and example.output == example.output.strip(), task.name
                assert len(example.output.split()) <= 5, (task.name, example.output)
                assert len(example.input) <= 310, task.name
                if task.labels is not None:
                    assert example.output in task.labels, (task.name, example.output)


def test_labels_are_balanced(suite):
    for task in (t for t in suite if t.labels):
        for split in SPLITS:
            counts = Counter(e.output for e in task.examples(split))
            total = sum(counts.values())
            assert set(counts) == set(task.labels), (task.name, split, counts)
            if len(task.labels) == 2:  # binary: each label within 40-60%
                assert all(0.4 <= c / total <= 0.6 for c in counts.values()), (task.name, split, counts)
            else:  # multi-class: no label dominates
                assert max(counts.values()) / total <= 2 / len(task.labels), (task.name, split, counts)


def test_prompt_and_target(suite):
    task = next(t for t in suite if t.name == "sentiment_rt")
    example = task.examples("test")[0]
    for index, template in enumerate(task.templates):
        prompt = task.prompt(example.input, index)
        assert prompt == template.format(input=example.input) and example.input in prompt
    assert task.target(example) == " " + example.output
    with pytest.raises(ValueError, match="template_index"):
        task.prompt("x", len(task.templates))
    with pytest.raises(ValueError, match="unknown split"):
        task.examples("dev")


def test_prompt_keeps_braces_in_input(suite):
    assert suite[0].prompt("a {weird} input") == suite[0].templates[0].format(input="a {weird} input")


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_task_file_round_trip(tmp_path):
    records = [{"input": f"word{i}", "output": f"W{i}"} for i in range(200)]
    path = write_lines(tmp_path / "mytask.jsonl", [json.dumps(r) for r in records] + [""])
    task = load_task_file(path)
    assert task.name == "mytask" and task.templates == ("Input: {input}\nOutput:",)
    assert task.kind == "custom" and task.seen is False and task.labels is None
    splits = {s: task.examples(s) for s in SPLITS}
    merged = sorted((e.input, e.output) for s in SPLITS for e in splits[s])
    assert merged == sorted((r["input"], r["output"]) for r in records)
    assert all(split_of(e.input) == s for s in SPLITS for e in splits[s])
    assert 90 <= len(splits["train"]) <= 150 and splits["valid"] and splits["test"]
    assert load_task_file(path).examples("test") == splits["test"]  # deterministic
    assert task.prompt("abc") == "Input: abc\nOutput:"
    assert task.target(Example("abc", "ABC")) == " ABC"


def test_load_task_file_custom_name_and_templates(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ['{"input": "a", "output": "b"}'])
    task = load_task_file(path, name="letters", templates=["Q: {input}\nA:", "{input} ->"])
    assert task.name == "letters" and task.prompt("z", 1) == "z ->"


@pytest.mark.parametrize("lines, message", [
    ([], "no records"),
    (["", "   "], "no records"),
    (['{"input": "a"}'], "missing field"),
    (['{"output": "a"}'], "missing field"),
    (['{"input": "a", "output": 7}'], "must be strings"),
    (['{"input": "a", "output": "  "}'], "empty"),
    (["not json"], "not valid JSON"),
    (['["a", "b"]'], "expected an object"),
])
def test_load_task_file_rejects_bad_files(tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        load_task_file(path)


@pytest.mark.parametrize("template", ["no field here", "{input} and {input}", "{query}", "{input} {}", "{input"])
def test_load_task_file_rejects_bad_templates(tmp_path, template):
    path = write_lines(tmp_path / "t.jsonl", ['{"input": "a", "output": "b"}'])
    with pytest.raises(ValueError, match="template"):
        load_task_file(path, templates=[template])


def test_load_task_file_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="JSONL"):
        load_task_file(tmp_path / "absent.jsonl")


def test_data_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("ATV_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="build_tasks.py"):
        load_suite()


def test_task_is_frozen(suite):
    with pytest.raises(AttributeError):
        suite[0].name = "other"
    assert isinstance(suite[0], Task) and isinstance(suite[0].templates, tuple)


def test_task_names_must_be_unique_and_an_empty_split_says_how_to_fix(tmp_path):
    from atv_core.tools.tasks import unique_names
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mine.jsonl").write_text('{"input": "x", "output": "y"}\n')
    one, two = (load_task_file(tmp_path / f / "mine.jsonl") for f in ("a", "b"))
    with pytest.raises(ValueError, match=r"two tasks are named 'mine' .*rename the task file"):
        unique_names([one, two])
    assert unique_names([one]) == [one]
    empty = next(s for s in ("train", "valid", "test") if split_of("x") != s)
    with pytest.raises(ValueError, match=rf"'mine' has no {empty} items: .* none of its 1 records fell in {empty}"):
        one.required(empty)
    assert one.required(split_of("x")) == [Example("x", "y")]


def test_a_task_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"input": "caf\u00e9", "output": "y"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.jsonl: not UTF-8 text .*save it as UTF-8"):
        load_task_file(path)


def test_a_rebuild_replaces_the_suite_and_keeps_the_hand_written_generic_prompts(tmp_path, monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("build_tasks", ROOT / "data" / "build_tasks.py")
    build = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "build_tasks", build)   # its dataclasses look their module up there
    spec.loader.exec_module(build)
    out, staging = tmp_path / "tasks", tmp_path / "staging"
    for folder in (out / "generic", out / "stale", staging / "fresh"):
        folder.mkdir(parents=True)
    (out / "suite.json").write_text("old")
    (out / "generic" / "eval.jsonl").write_text('{"prompt": "hi"}\n')
    (staging / "suite.json").write_text("new")
    build.replace_dir(staging, out)
    assert (out / "suite.json").read_text() == "new" and (out / "fresh").is_dir() and not (out / "stale").exists()
    assert (out / "generic" / "eval.jsonl").read_text() == '{"prompt": "hi"}\n'
