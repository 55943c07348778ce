"""`atv` subcommands: user mistakes end in one line on stderr and exit 2, before any model loads."""
import pytest

from atv_core.cli import main


@pytest.fixture
def task_files(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mine.jsonl").write_text('{"input": "x", "output": "y"}\n')
    return tmp_path / "a" / "mine.jsonl", tmp_path / "b" / "mine.jsonl"


def run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:   # argparse, and `vectors build`, which reports its own errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["train", "--epochs", "0"], "atv train: error: training settings out of range: epochs (0)"),
    (["train", "--epochs", "abc"], "atv train: error: --epochs: expected int, got 'abc'"),
    (["train", "--optimizer", "sgd"], "optimizer must be adam or adamw"),
    (["train", "--task-files", "/nonexistent/t.jsonl", "--tasks", "antonym"], "/nonexistent/t.jsonl is not a file"),
    (["vectors", "build", "--task-file", "/nonexistent/t.jsonl", "--name", "n"], "/nonexistent/t.jsonl is not a file"),
])
def test_user_mistakes_are_one_line_and_exit_2(argv, said, capsys, tmp_path):
    code, err = run(argv + ["--out", str(tmp_path / "out")], capsys)
    assert code == 2 and said in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()   # refused before anything was written


def test_atv_traceback_shows_where_a_refusal_came_from(monkeypatch, tmp_path):
    monkeypatch.setenv("ATV_TRACEBACK", "1")
    with pytest.raises(ValueError, match="epochs"):
        main(["train", "--epochs", "0", "--out", str(tmp_path / "out")])


def test_duplicate_task_names_are_refused_by_eval_and_train(task_files, capsys, tmp_path):
    a, b = map(str, task_files)
    code, err = run(["eval", "--task-file", a, b, "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "two tasks are named 'mine'" in err, err
    code, err = run(["train", "--tasks", "antonym", "--task-files", a, b, "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and "two tasks are named 'mine'" in err, err


def test_a_task_file_with_no_training_items_is_refused_before_the_model_loads(tmp_path, capsys):
    from atv_core.tools.tasks import split_of
    text = next(f"item {i}" for i in range(100) if split_of(f"item {i}") == "test")
    path = tmp_path / "few.jsonl"
    path.write_text(f'{{"input": "{text}", "output": "y"}}\n')
    code, err = run(["vectors", "build", "--task-file", str(path), "--name", "few", "--out", str(tmp_path / "v"),
                     "--model", "/nonexistent/model"], capsys)
    assert code == 2 and "'few' has no train items" in err and "add records" in err, err


def test_group_help_lists_its_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["vectors", "--help"])
    assert exit_.value.code == 0 and "{build,list}" in capsys.readouterr().out
    code, err = run(["bench"], capsys)
    assert code == 2 and "usage: atv bench [-h] {engine,prefix,serve}" in err
