"""lm-evaluation-harness tasks (tests/lm_eval_tasks/) and the harness itself against a real `atv serve`.

The unmarked tests check the task material: documents are the suite's test splits, prompts are the suite's
templates (so `atv vectors build --task NAME` builds for the format the harness sends). The integration
tests create the harness venv (tests/lm_eval_harness.py; minutes the first time), build one named vector per
task from its training split (`atv vectors build --task`), start `atv serve --vectors` on the real embedded
default and run both tasks (40 documents each) offline, choosing the steering preset by model id only:
`<base>:off` (both tasks in one harness run), then `<base>:vector/<task>` per task. Multiple choice
exercises prompt logprobs (`echo` + `logprobs`, text requests). The generation task is one the plain model
answers in a sentence rather than with the bare number; its named vector must score >= 10 points more.
"""
import json
import subprocess
import sys
import urllib.request

import pytest
import yaml

from atv_core.models import EMBEDDED_TARGET, resolve_model_path
from atv_core.tools.tasks import load_suite
from tests.lm_eval_harness import ROOT, TASKS_DIR, harness_python, run_harness, start_server

TASKS = {  # harness task -> (suite task, documents file, index of the suite template it uses)
    "atv_next_number_gen": ("next_number", "next_number.jsonl", 0),
    "atv_sentiment_rt_mc": ("sentiment_rt", "sentiment_rt.jsonl", 1),
}


def _yaml(task: str) -> dict:
    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("!function", lambda loader, node: ("!function", loader.construct_scalar(node)))
    return yaml.load((TASKS_DIR / f"{task}.yaml").read_text(), Loader=Loader)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_documents_and_prompts_are_the_suites(task):
    suite_name, documents, template = TASKS[task]
    suite_task = load_suite(names=[suite_name])[0]
    docs = [json.loads(line) for line in (TASKS_DIR / documents).read_text().splitlines() if line.strip()]
    assert len(docs) >= 40
    assert [(d["input"], d["output"]) for d in docs] == [(e.input, e.output) for e in suite_task.examples("test")]
    config = _yaml(task)
    assert config["task"] == task and config["dataset_kwargs"]["file"] == documents
    assert config["custom_dataset"] == ("!function", "utils.load_docs")
    assert config["doc_to_text"].replace("{{input}}", "{input}") == suite_task.templates[template]
    if config["output_type"] == "multiple_choice":
        assert sorted(config["doc_to_choice"]) == sorted(suite_task.labels)


# ---- the harness against a running server (integration) -------------------------------------------
OFF, DOCS = f"{EMBEDDED_TARGET}:off", 40


@pytest.fixture(scope="module")
def harness():
    return harness_python()


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    """One named vector per task, built from the task's training split as a user would."""
    folder = tmp_path_factory.mktemp("vectors")
    for suite_task in sorted({suite for suite, _, _ in TASKS.values()}):
        done = subprocess.run([sys.executable, "-m", "atv_core.cli", "vectors", "build", "--task", suite_task,
                               "--name", suite_task, "--out", str(folder), "--device", "cpu"],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, vectors):
    log = tmp_path_factory.mktemp("atv-serve") / "server.log"
    with start_server(["--model", EMBEDDED_TARGET, "--vectors", str(vectors)], log) as url:
        yield url


@pytest.fixture(scope="module")
def off_run(harness, server, tmp_path_factory):
    """Both tasks with steering off, chosen by the model id alone."""
    return run_harness(harness, sorted(TASKS), OFF, server, resolve_model_path(EMBEDDED_TARGET),
                       tmp_path_factory.mktemp("harness-off"), limit=DOCS)


def _complete(url: str, prompt: str, max_tokens: int, stop: list[str]) -> str:
    body = {"model": OFF, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": stop}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)["choices"][0]["text"]


@pytest.mark.integration
def test_generate_until_runs_offline(off_run, server):
    assert off_run.returncode == 0, off_run.log[-4000:]
    samples = off_run.samples["atv_next_number_gen"]
    assert len(samples) == DOCS
    score = off_run.metric("atv_next_number_gen", "exact_match,strip")
    assert score == sum(s["exact_match"] for s in samples) / DOCS
    for sample in samples[:3]:  # what the harness got is what the server answers any client
        prompt, kwargs = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]
        assert sample["resps"][0][0] == _complete(server, prompt, kwargs["max_gen_toks"], kwargs["until"])


@pytest.mark.integration
def test_multiple_choice_runs_offline(off_run):
    assert off_run.returncode == 0, off_run.log[-4000:]
    samples = off_run.samples["atv_sentiment_rt_mc"]
    assert len(samples) == DOCS
    assert off_run.metric("atv_sentiment_rt_mc", "acc,none") == sum(s["acc"] for s in samples) / DOCS
    for sample in samples:   # two scored options, each a loglikelihood from the prompt logprobs (logged as text)
        (pos, _), (neg, _) = sample["filtered_resps"]
        assert float(pos) < 0 and float(neg) < 0 and pos != neg


@pytest.mark.integration
def test_named_vectors_chosen_by_model_id(harness, server, off_run, tmp_path):
    runs = {task: run_harness(harness, [task], f"{EMBEDDED_TARGET}:vector/{suite}", server,
                              resolve_model_path(EMBEDDED_TARGET), tmp_path / task, limit=DOCS)
            for task, (suite, _, _) in TASKS.items()}
    for task, run in runs.items():
        assert run.returncode == 0, run.log[-4000:]
        assert len(run.samples[task]) == DOCS
    steered = runs["atv_next_number_gen"].metric("atv_next_number_gen", "exact_match,strip")
    off = off_run.metric("atv_next_number_gen", "exact_match,strip")
    assert steered >= off + 0.10, (steered, off)
    mc_off = [s["filtered_resps"] for s in off_run.samples["atv_sentiment_rt_mc"]]
    mc_vec = [s["filtered_resps"] for s in runs["atv_sentiment_rt_mc"].samples["atv_sentiment_rt_mc"]]
    assert mc_off != mc_vec   # the named vector steers the scored prompt too
