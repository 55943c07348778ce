"""Steering presets as model ids and named vectors over HTTP, against a real uvicorn with tiny models: the
listing, selection by exact id (a base id containing ':'), the `atv` field winning over the preset, 404 for
unknown ids, and POST /v1/vectors/reload (API key, a bad file refused by name, the old set kept)."""
from __future__ import annotations

import json

import httpx
import pytest
import torch
from pydantic import SecretStr

from atv_core.engine.async_engine import AsyncEngine
from atv_core.engine.build import build_engine
from atv_core.engine.llm_engine import EngineConfig
from atv_core.steering.vectors import VectorLayout, write_vector
from tests.test_server import assert_error, make_settings, serving
from tests.tiny import make_tiny_generator_dir, make_tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = "embedded:tiny"     # contains ':' like the embedded default's id
LAYOUT = VectorLayout(target_layers=3, layers=(0, 1, 2), hidden_size=32, target="tiny")
KEY = "sekrit"


def _write(folder, name: str, seed: int, shape=(3, 32), layout=LAYOUT) -> None:
    vector = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    write_vector(folder, name, vector, layout, {"recipe": "test"})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    vectors = root / "vectors"
    vectors.mkdir()
    _write(vectors, "alpha", 1)
    return make_tiny_model_dir(root / "model"), make_tiny_generator_dir(root / "gen"), vectors


def _engine(model, generator, vectors) -> AsyncEngine:
    config = EngineConfig(max_running=4, max_waiting=4)
    # fp32: the echo test compares with an fp32 forward, and dtype auto is bf16 on CPUs with AVX512-BF16/AMX
    return AsyncEngine(build_engine(str(model), generator, device="cpu", dtype="float32", config=config,
                                    vectors=vectors))


@pytest.fixture(scope="module")
def served(assets):
    model, generator, vectors = assets
    settings = make_settings(served_model_name=BASE, api_key=SecretStr(KEY), vectors=str(vectors))
    with serving(_engine(model, generator, vectors), settings) as s:
        yield s


def _post(served, path, body=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(served.url + path, json=body, headers=headers, timeout=60)


def _complete(served, model, **extra) -> httpx.Response:
    return _post(served, "/v1/completions", {"model": model, "prompt": "Hello there", "max_tokens": 3,
                                             "temperature": 0.0, **extra})


def _model_ids(served) -> list[str]:
    r = httpx.get(served.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200, r.text
    return [card["id"] for card in r.json()["data"]]


def test_models_lists_the_base_and_every_preset(served):
    assert _model_ids(served) == [BASE, f"{BASE}:off", f"{BASE}:atv", f"{BASE}:vector/alpha"]
    cards = httpx.get(served.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["data"]
    assert [c["steering"] for c in cards] == ["atv", "off", "atv", "vector"]   # the base: the server's default


def test_a_server_without_generator_lists_no_atv_preset(assets):
    model, _, vectors = assets
    with serving(_engine(model, None, vectors), make_settings(model="tiny", vectors=str(vectors))) as s:
        cards = httpx.get(s.url + "/v1/models", timeout=10).json()["data"]
        assert [c["id"] for c in cards] == ["tiny", "tiny:off", "tiny:vector/alpha"]
        assert cards[0]["steering"] == "off"   # the default without a generator


@pytest.mark.parametrize("suffix, mode, vector", [("", "atv", None), (":off", "off", None), (":atv", "atv", None),
                                                  (":vector/alpha", "vector", "alpha")])
def test_the_model_id_selects_the_preset(served, suffix, mode, vector):
    r = _complete(served, BASE + suffix)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == BASE + suffix
    assert body["choices"][0]["atv"]["mode"] == mode and body["choices"][0]["atv"]["vector"] == vector


def test_presets_steer_differently(served):
    logprob = lambda model: _complete(served, model, logprobs=1)  # noqa: E731
    off = logprob(f"{BASE}:off").json()["choices"][0]["logprobs"]["token_logprobs"]
    vec = logprob(f"{BASE}:vector/alpha").json()["choices"][0]["logprobs"]["token_logprobs"]
    assert off != vec


def test_an_explicit_atv_field_wins_over_the_preset(served):
    r = _complete(served, f"{BASE}:vector/alpha", atv={"mode": "off"})
    assert r.status_code == 200 and r.json()["choices"][0]["atv"]["mode"] == "off", r.text
    chat = _post(served, "/v1/chat/completions", {"model": f"{BASE}:off", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "hi"}],
                                                  "atv": {"vector": "alpha"}})
    assert chat.status_code == 200 and chat.json()["choices"][0]["atv"]["vector"] == "alpha", chat.text


def test_each_model_id_can_be_retrieved(served):
    for model_id in _model_ids(served):   # ids hold ':' and '/'
        r = httpx.get(f"{served.url}/v1/models/{model_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.status_code == 200 and r.json()["id"] == model_id, r.text
    missing = httpx.get(f"{served.url}/v1/models/{BASE}:vector/nope", headers={"Authorization": f"Bearer {KEY}"})
    assert_error(missing, 404, "model")
    assert_error(httpx.get(f"{served.url}/v1/models/{BASE}"), 401)


def test_engine_refusals_name_the_field(served):
    error = assert_error(_complete(served, BASE, atv={"vector": "nope"}), 400, "atv.vector")
    assert "unknown vector 'nope'; this server has: alpha" in error["message"], error
    examples = [{"input": "a", "output": "b"}]   # this generator was not trained to read them
    error = assert_error(_complete(served, BASE, atv={"examples": examples}), 400, "atv.examples")
    assert "not trained to read atv.examples" in error["message"], error
    chat = _post(served, "/v1/chat/completions", {"model": BASE, "max_tokens": 2, "atv": {"examples": examples},
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert_error(chat, 400, "atv.examples")
    assert_error(_complete(served, BASE, prompt=[0] * 3 + [10**6]), 400, "prompt")


def test_a_request_failed_on_its_own_field_is_400_and_a_failed_generation_500():
    from atv_core.engine.request import RequestOutput
    from server.openai_api import failed_error

    removed = failed_error(RequestOutput("r", "", [], None, True, "error", "named vector 'beta' was removed",
                                         "atv.vector"))
    assert (removed.status, removed.param, removed.message) == (400, "atv.vector", "named vector 'beta' was removed")
    prompt = failed_error(RequestOutput("r", "", [], None, True, "error", "no", error_field="prompt"), "messages")
    assert (prompt.status, prompt.param) == (400, "messages")
    broken = failed_error(RequestOutput("r", "", [], None, True, "error", "the steering vector is non-finite"))
    assert (broken.status, broken.code) == (500, "generation_failed") and "non-finite" in broken.message


@pytest.mark.parametrize("model", ["embedded", f"{BASE}:", f"{BASE}:vector/nope", f"{BASE}:vector", "tiny:off",
                                   f"{BASE}:off:off"])
def test_unknown_model_ids_are_404(served, model):
    assert_error(_complete(served, model), 404, "model")


def test_reload_needs_the_key_adds_vectors_and_refuses_a_bad_file(served, assets):
    _, _, vectors = assets
    assert_error(_post(served, "/v1/vectors/reload", key=None), 401)
    _write(vectors, "beta", 2)
    r = _post(served, "/v1/vectors/reload")
    assert r.status_code == 200 and r.json()["data"] == ["alpha", "beta"], r.text
    assert f"{BASE}:vector/beta" in _model_ids(served)
    assert _complete(served, f"{BASE}:vector/beta").status_code == 200
    _write(vectors, "narrow", 3, (3, 16), VectorLayout(3, (0, 1, 2), 16))
    try:
        error = assert_error(_post(served, "/v1/vectors/reload"), 400)
        assert "narrow.safetensors" in error["message"] and "expected [3, 32]" in error["message"], error
        assert _model_ids(served)[-2:] == [f"{BASE}:vector/alpha", f"{BASE}:vector/beta"]   # the old set kept
    finally:
        (vectors / "narrow.safetensors").unlink()
        (vectors / "narrow.json").unlink()
        (vectors / "beta.safetensors").unlink()
        (vectors / "beta.json").unlink()
        assert _post(served, "/v1/vectors/reload").json()["data"] == ["alpha"]


def test_reload_without_a_vectors_folder_is_400(assets):
    model, _, _ = assets
    with serving(_engine(model, None, None), make_settings()) as s:
        assert_error(httpx.post(s.url + "/v1/vectors/reload", timeout=10), 400)
        assert [c["id"] for c in httpx.get(s.url + "/v1/models", timeout=10).json()["data"]] == ["tiny", "tiny:off"]


# ---- token-id prompts ---------------------------------------------------------------------------
def test_token_id_prompts_equal_their_text(served):
    from tests.tiny import make_tokenizer

    ids = make_tokenizer()("Hello there").input_ids
    text = _complete(served, BASE, logprobs=2).json()["choices"][0]
    as_ids = _post(served, "/v1/completions", {"model": BASE, "prompt": ids, "max_tokens": 3, "temperature": 0.0,
                                               "logprobs": 2})
    assert as_ids.status_code == 200, as_ids.text
    got = as_ids.json()["choices"][0]
    assert got["text"] == text["text"] and got["logprobs"] == text["logprobs"]
    assert got["atv"]["mode"] == "atv" and got["atv"]["vector_norm"] == text["atv"]["vector_norm"]  # same text read
    both = _post(served, "/v1/completions", {"model": BASE, "prompt": [ids, ids[:2]], "max_tokens": 2})
    assert both.status_code == 200 and len(both.json()["choices"]) == 2, both.text
    assert both.json()["usage"]["prompt_tokens"] == len(ids) + 2


@pytest.mark.parametrize("prompt", [[10**6], [[1, 2], [10**6]], [-1], [1, "a"], [], [[]]])
def test_bad_token_id_prompts_are_400(served, prompt):
    assert_error(_post(served, "/v1/completions", {"model": BASE, "prompt": prompt, "max_tokens": 2}), 400)


# ---- prompt logprobs (echo + logprobs) ----------------------------------------------------------
def _echo(served, model, **extra) -> dict:
    r = _post(served, "/v1/completions", {"model": model, "prompt": "Hello there, general", "echo": True,
                                          "logprobs": 2, "max_tokens": 0, "temperature": 0.0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_logprobs_score_the_prompt_like_a_plain_forward(served, assets):
    from transformers import AutoModelForCausalLM

    from tests.tiny import make_tokenizer

    body = _echo(served, f"{BASE}:off")
    choice, ids = body["choices"][0], make_tokenizer()("Hello there, general").input_ids
    lp = choice["logprobs"]
    assert choice["text"] == "Hello there, general" and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(1 <= len(top) <= 3 and top[token] == logprob   # the 2 most likely and the prompt's own token
               for top, token, logprob in zip(lp["top_logprobs"][1:], lp["tokens"][1:], lp["token_logprobs"][1:]))
    model = AutoModelForCausalLM.from_pretrained(assets[0])
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), want, atol=1e-4, rtol=0)
    steered = _echo(served, f"{BASE}:vector/alpha")["choices"][0]["logprobs"]["token_logprobs"][1:]
    assert max(abs(a - b) for a, b in zip(steered, lp["token_logprobs"][1:])) > 1e-3
    one = _echo(served, f"{BASE}:off", max_tokens=1, prompt=ids)["choices"][0]   # a token-id prompt, one token
    assert len(one["logprobs"]["tokens"]) == len(ids) + 1 and one["logprobs"]["token_logprobs"][:-1] == \
        lp["token_logprobs"]


def test_echo_of_a_token_id_prompt_keeps_its_special_tokens_like_its_logprobs(served):
    """The echoed text of a token-id prompt and its prompt logprobs' tokens and offsets describe the same
    text: special tokens (here a leading <s>) are in both, as vLLM echoes them."""
    from tests.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    ids = [tokenizer.bos_token_id] + tokenizer("Hello there").input_ids
    choice = _echo(served, f"{BASE}:off", prompt=ids)["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == "<s>Hello there" == "".join(lp["tokens"])
    assert lp["text_offset"] == [choice["text"].index(t, o) for t, o in zip(lp["tokens"], lp["text_offset"])]
    assert lp["text_offset"][-1] + len(lp["tokens"][-1]) == len(choice["text"])


def test_echo_logprobs_stream_the_prompt_once(served):
    with httpx.stream("POST", served.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
            "model": f"{BASE}:off", "prompt": "Hello there", "echo": True, "logprobs": 1, "max_tokens": 2,
            "temperature": 0.0, "ignore_eos": True,   # exactly 2 tokens: a sampled EOS would end it after 1
            "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    with_logprobs = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    assert with_logprobs[0]["token_logprobs"][0] is None and len(with_logprobs[0]["tokens"]) > 2
    assert sum(len(lp["tokens"]) for lp in with_logprobs) == len(with_logprobs[0]["tokens"]) + 1


# ---- metrics ------------------------------------------------------------------------------------
def test_request_metrics_carry_the_preset_id_and_default_metrics_pass_promtool(served):
    import shutil
    import subprocess

    from tests.test_server import metric, scrape

    before = scrape(served.url)
    assert _complete(served, f"{BASE}:off").status_code == 200
    after = scrape(served.url)
    for name, labels in [("atv_requests_finished_total", {"finish_reason": "length"}),
                         ("atv_e2e_request_latency_seconds_count", {}), ("atv_time_to_first_token_seconds_count", {}),
                         ("atv_requests_steering_total", {"mode": "off"})]:
        key = dict(labels, model_name=f"{BASE}:off")
        assert metric(after, name, **key) == metric(before, name, **key) + 1, name
    assert metric(after, "atv_generation_tokens_total", model_name=f"{BASE}:off") - \
        metric(before, "atv_generation_tokens_total", model_name=f"{BASE}:off") == 3
    assert not any(name.startswith("vllm:") for name, _ in after)   # off by default
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    text = httpx.get(served.url + "/metrics", timeout=10).content
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_vllm_metrics_setting_exports_vllm_names(assets):
    from tests.test_server import metric, scrape

    model, _, _ = assets
    with serving(_engine(model, None, None), make_settings(vllm_metrics=True)) as s:
        assert httpx.post(s.url + "/v1/completions", json={"model": "tiny:off", "prompt": "hi", "max_tokens": 2},
                          timeout=60).status_code == 200
        m = scrape(s.url)
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count"):
        assert metric(m, name, model_name="tiny:off") == 1, name
    assert metric(m, "vllm:inter_token_latency_seconds_count", model_name="tiny:off") == 1
    assert metric(m, "vllm:request_success_total", model_name="tiny:off", finished_reason="length") == 1
    assert metric(m, "vllm:generation_tokens_total", model_name="tiny:off") == 2
    assert metric(m, "vllm:prompt_tokens_total", model_name="tiny:off") > 0
    assert ("vllm:num_requests_waiting", frozenset({("model_name", "tiny")})) in m
    assert ("vllm:num_requests_running", frozenset({("model_name", "tiny")})) in m
    assert metric(m, "vllm:kv_cache_usage_perc", model_name="tiny") == metric(m, "atv_kv_cache_usage")
    assert metric(m, "vllm:prefix_cache_queries_total", model_name="tiny") == metric(m, "atv_prefix_cache_queries_total") > 0
    assert ("vllm:prefix_cache_hits_total", frozenset({("model_name", "tiny")})) in m
    assert metric(m, "vllm:num_preemptions_total", model_name="tiny") == metric(m, "atv_num_preemptions_total") == 0
    assert metric(m, "atv_e2e_request_latency_seconds_count", model_name="tiny:off") == 1   # atv_ series unchanged


def test_preemptions_are_counted_in_metrics(assets):
    """A KV budget of 20 blocks of 4 tokens holds three ~20-token prompts, or one of them grown by 40 tokens,
    but not all three grown: the engine preempts (and later recomputes) the newest; every request still
    completes and /metrics counts the preemptions."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoModelForCausalLM

    from tests.test_server import metric, scrape
    from tests.tiny import kv_budget

    model = assets[0]
    config = EngineConfig(max_running=4, block_size=4,
                          kv_cache_bytes=kv_budget(AutoModelForCausalLM.from_pretrained(model), 20))
    engine = AsyncEngine(build_engine(str(model), None, device="cpu", dtype="float32", config=config))  # the
    prompts = ["the first prompt, 23 b.", "twelve bytes", "and the third one, 25 b.."]   # budget is fp32 blocks
    with serving(engine, make_settings(vllm_metrics=True)) as s:
        def complete(prompt):
            return httpx.post(s.url + "/v1/completions", json={"model": "tiny:off", "prompt": prompt,
                              "max_tokens": 40, "ignore_eos": True}, timeout=120)
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(complete, prompts))
        m = scrape(s.url)
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in replies)
    assert metric(m, "atv_num_preemptions_total") == metric(m, "vllm:num_preemptions_total", model_name="tiny") > 0
