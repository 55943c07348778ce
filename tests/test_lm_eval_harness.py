"""lm-evaluation-harness tasks (tests/lm_eval_tasks/) and the harness itself against a real `atv serve`.

The unmarked tests check the task material: documents are the suite's test splits, prompts are the suite's
templates (so `atv vectors build --task NAME` builds for the format the harness sends). The integration
tests create the harness venv (tests/lm_eval_harness.py; minutes the first time), start `atv serve` on the
real embedded default and run both tasks offline. Multiple choice needs prompt logprobs (`echo` +
`logprobs`), which the server does not return yet: that test is a strict xfail until it does.
"""
import json
import urllib.request

import pytest
import yaml

from atv_core.models import EMBEDDED_TARGET, resolve_model_path
from atv_core.tools.tasks import load_suite
from tests.lm_eval_harness import TASKS_DIR, harness_python, run_harness, start_server

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
@pytest.fixture(scope="module")
def harness():
    return harness_python()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("atv-serve") / "server.log"
    with start_server(["--model", EMBEDDED_TARGET], log) as url:
        yield url


def _complete(url: str, prompt: str, max_tokens: int, stop: list[str]) -> str:
    body = {"model": EMBEDDED_TARGET, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": stop}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)["choices"][0]["text"]


@pytest.mark.integration
def test_generate_until_runs_offline(harness, server, tmp_path):
    run = run_harness(harness, ["atv_next_number_gen"], EMBEDDED_TARGET, server,
                      resolve_model_path(EMBEDDED_TARGET), tmp_path, limit=40)
    assert run.returncode == 0, run.log[-4000:]
    samples = run.samples["atv_next_number_gen"]
    assert len(samples) == 40
    score = run.metric("atv_next_number_gen", "exact_match,strip")
    assert score == sum(s["exact_match"] for s in samples) / 40
    for sample in samples[:3]:  # what the harness got is what the server answers any client
        prompt, kwargs = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]
        assert sample["resps"][0][0] == _complete(server, prompt, kwargs["max_gen_toks"], kwargs["until"])


@pytest.mark.integration
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="multiple choice needs prompt logprobs (echo + "
                   "logprobs); the server answers 400 'echo with logprobs is not supported' until they exist")
def test_multiple_choice_runs_offline(harness, server, tmp_path):
    run = run_harness(harness, ["atv_sentiment_rt_mc"], EMBEDDED_TARGET, server,
                      resolve_model_path(EMBEDDED_TARGET), tmp_path, limit=4)
    if run.returncode != 0 and "400 Client Error" not in run.log:
        pytest.fail(f"the harness failed for another reason than the known 400:\n{run.log[-4000:]}")
    assert run.returncode == 0, run.log[-4000:]
    assert len(run.samples["atv_sentiment_rt_mc"]) == 4
