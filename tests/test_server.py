"""The HTTP server against a real uvicorn on a free port, with tiny random models built in-process.

One module-wide server (tiny Llama target + tiny generator, 4 running / 4 waiting) serves most tests;
settings that a test changes (API key, timeout, limits) are patched on its state for that test only.
Counters are compared as deltas, so the order of the tests does not matter. Only the SIGTERM drain runs
`atv serve` in a subprocess; tests/test_server_slow.py serves the real embedded model.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr, ValidationError

from atv_core.engine.build import build_engine
from atv_core.engine.async_engine import AsyncEngine
from atv_core.engine.llm_engine import EngineConfig
from server.app import cli, create_app
from server.metrics import Metrics
from server.settings import Settings, parse_settings
from tests.tiny import make_tiny_generator_dir, make_tiny_model_dir, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
ERROR_KEYS = {"message", "type", "param", "code"}


# ---- servers ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn.Server running `app` on a thread (no signal handlers off the main thread)."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        eventually(lambda: self.server.started, timeout=20)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class Served:
    url: str
    app: object
    engine: AsyncEngine

    @property
    def state(self):
        return self.app.state.atv

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        kw.setdefault("timeout", 60)
        return httpx.post(self.url + path, json=body, **kw)


def async_engine(model_dir: Path, generator_dir: Path | None, **limits) -> AsyncEngine:
    config = EngineConfig(**{"max_running": 4, "max_waiting": 4, **limits})
    return AsyncEngine(build_engine(str(model_dir), generator_dir, device="cpu", config=config))


def make_settings(**overrides) -> Settings:
    base = dict(model="tiny", generator="none", api_key=None, max_tokens=64, max_prompt_tokens=None,
                request_timeout=60.0, log_prompts=True)
    return Settings(**{**base, **overrides})


@contextlib.contextmanager
def serving(engine: AsyncEngine | None, settings: Settings):
    app = create_app(engine.start() if engine else None, settings)   # its Metrics from the settings
    try:
        with ServerThread(app) as thread:
            yield Served(thread.url, app, engine)
    finally:
        if engine is not None:
            engine.shutdown()




@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("server-assets")
    return SimpleNamespace(model=make_tiny_model_dir(root / "model"), generator=make_tiny_generator_dir(root / "gen"))


@pytest.fixture(scope="module")
def main(assets):
    """Tiny target + tiny generator; 4 running, 4 waiting, max_tokens 64."""
    with serving(async_engine(assets.model, assets.generator), make_settings()) as served:
        yield served


@pytest.fixture(scope="module")
def plain(assets):
    """The same target without a generator."""
    with serving(async_engine(assets.model, None), make_settings()) as served:
        yield served


@pytest.fixture
def slow_steps(main):
    """Make every engine step take >= 20 ms, so that a 64-token request lasts over a second."""
    listener = lambda stats: time.sleep(0.02)  # noqa: E731
    main.engine.engine.step_listeners.append(listener)
    yield
    main.engine.engine.step_listeners.remove(listener)


# ---- helpers ------------------------------------------------------------------------------------
def eventually(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def scrape(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    """The sum over the samples of `name` whose labels include `labels` (model_name and the like summed out)."""
    want = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and want <= have)


def idle(served: Served) -> bool:
    m = scrape(served.url)
    return (metric(m, "atv_num_requests_running") == 0 and metric(m, "atv_num_requests_waiting") == 0
            and metric(m, "atv_vector_slots_used") == 0 and metric(m, "atv_kv_cache_usage") == 0
            and not served.engine.engine.runner.rows)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def sse_events(response: httpx.Response) -> list:
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def completion(served: Served, **body) -> dict:
    response = served.post("/v1/completions", {"prompt": "Hello there", "max_tokens": 4, **body})
    assert response.status_code == 200, response.text
    return response.json()


# ---- the official client ------------------------------------------------------------------------
def test_openai_client_completions_and_chat(main):
    from openai import OpenAI

    client = OpenAI(base_url=main.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id   # the base id; the steering presets follow it
    done = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
    assert done.model_extra["atv"]["mode"] == "atv" and done.model_extra["atv"]["vector_norm"] > 0
    chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                          extra_body={"atv": {"mode": "off"}, "ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    assert chat.model_extra["atv"] == {"mode": "off", "scale": 1.0, "vector": None, "vector_norm": None,
                                       "gate": None, "generator_s": None}
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"atv": {"mode": "off"}, "ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].choices == []


# ---- request fields -----------------------------------------------------------------------------
def test_prompt_list_n_and_usage(main):
    body = completion(main, prompt=["Hello", "Good morning"], n=2, temperature=0, ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: the n choices agree
    tokenizer = make_tokenizer()  # the served one belongs to the engine's threads
    prompt_tokens = len(tokenizer("Hello").input_ids) + len(tokenizer("Good morning").input_ids)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 16,
                             "total_tokens": prompt_tokens + 16}


def test_continuous_usage_stats_put_each_choices_usage_in_every_chunk(main):
    """vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk carries its choice's usage so
    far; the last chunk is the whole request's usage, as with include_usage alone."""
    body = {"prompt": ["Hello", "Good morning"], "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", main.url + "/v1/completions", json=body, timeout=60) as response:
        events = sse_events(response)
    tokenizer = make_tokenizer()
    prompts = [len(tokenizer(p).input_ids) for p in body["prompt"]]
    seen = {0: 0, 1: 0}
    for event in events[:-1]:
        index = event["choices"][0]["index"]
        usage = event["usage"]
        assert usage["prompt_tokens"] == prompts[index] and usage["completion_tokens"] >= seen[index], event
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        seen[index] = usage["completion_tokens"]
    assert seen == {0: 3, 1: 3}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    for options, every, last in (({"continuous_usage_stats": True}, True, True),       # alone: both (vLLM)
                                 ({"include_usage": False, "continuous_usage_stats": True}, False, False),
                                 ({"include_usage": None, "continuous_usage_stats": None}, False, False)):
        with httpx.stream("POST", main.url + "/v1/completions", timeout=60, json={
                **body, "stream_options": options}) as response:
            events = sse_events(response)
        assert all(("usage" in e) == every for e in events[:-1]) and ("usage" in events[-1]) == last, options
    # chat: the role chunk counts 0 tokens, each content chunk the tokens up to it, as vLLM
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", main.url + "/v1/chat/completions", json=chat, timeout=60) as response:
        counts = [e["usage"]["completion_tokens"] for e in sse_events(response)]
    assert counts[0] == 0 and counts[-1] == 3 and counts == sorted(counts), counts


def test_seed_reproducible_and_choices_differ(main):
    first = completion(main, seed=7, n=2, max_tokens=8, ignore_eos=True)
    again = completion(main, seed=7, n=2, max_tokens=8, ignore_eos=True)
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert first["choices"][0]["text"] != first["choices"][1]["text"]  # choice i uses seed + i


def test_stop_echo_logprobs_and_max_tokens_default(main):
    free = completion(main, temperature=0, max_tokens=8, ignore_eos=True)["choices"][0]["text"]
    stop = next(ch for ch in free[1:] if ch.isascii() and ch.isprintable())  # random bytes: pick a plain one
    stopped = completion(main, temperature=0, max_tokens=8, ignore_eos=True, stop=[stop])["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == free[: free.index(stop)]
    assert stopped["stop_reason"] == stop                         # vLLM's: which stop string ended it
    stop_id = make_tokenizer().convert_tokens_to_ids(make_tokenizer().tokenize(stop))[0]   # one byte, one token
    by_id = completion(main, temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop_id])["choices"][0]
    assert by_id["finish_reason"] == "stop" and by_id["text"] == free[: free.index(stop)]   # vLLM's extension
    assert by_id["stop_reason"] == stop_id
    with httpx.stream("POST", main.url + "/v1/completions", timeout=30, json={
            "prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True,
            "stop": ["\u2603", stop]}) as response:
        last = sse_events(response)[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and last["stop_reason"] == stop
    chat = main.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello there"}],
                                              "max_tokens": 4, "temperature": 0, "ignore_eos": True}).json()
    assert chat["choices"][0]["finish_reason"] == "length" and chat["choices"][0]["stop_reason"] is None
    echoed = completion(main, temperature=0, max_tokens=8, ignore_eos=True, echo=True)["choices"][0]
    assert echoed["text"] == "Hello there" + free
    back = completion(main, max_tokens=0, echo=True)   # the prompt back, nothing sampled (OpenAI), no logprobs asked
    assert back["choices"][0]["text"] == "Hello there" and back["choices"][0]["logprobs"] is None
    assert back["choices"][0]["finish_reason"] == "length" and back["usage"]["completion_tokens"] == 0
    with httpx.stream("POST", main.url + "/v1/completions", timeout=30,
                      json={"prompt": "Hello there", "max_tokens": 0, "echo": True, "stream": True}) as response:
        events = sse_events(response)
    assert "".join(e["choices"][0]["text"] for e in events) == "Hello there"
    assert all(e["choices"][0]["logprobs"] is None for e in events)   # none asked for, none streamed
    logprobs = completion(main, temperature=0, max_tokens=3, ignore_eos=True, logprobs=2)["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 3
    assert all(len(top) <= 2 and lp <= 0 for top, lp in zip(logprobs["top_logprobs"], logprobs["token_logprobs"]))
    for k in (0, 1):   # top_logprobs: the k most likely tokens and the sampled one (as vLLM), at any temperature
        sampled = completion(main, temperature=2.0, seed=3, max_tokens=6, ignore_eos=True, logprobs=k)
        lp = sampled["choices"][0]["logprobs"]
        assert all(top[token] == logprob and len(top) <= k + 1
                   for top, token, logprob in zip(lp["top_logprobs"], lp["tokens"], lp["token_logprobs"]))
        assert k or all(len(top) == 1 for top in lp["top_logprobs"])
    default = main.post("/v1/completions", {"prompt": "Hi", "ignore_eos": True}).json()
    assert default["usage"]["completion_tokens"] == 16


def test_underflowing_temperature_and_top_p_are_served(main):
    # 1e-300 is 0 in float32; the engine's sampler dies on it, so the server maps it (vLLM: below 1e-5 = greedy)
    greedy = completion(main, temperature=0, ignore_eos=True)["choices"][0]["text"]
    assert completion(main, temperature=1e-300, ignore_eos=True)["choices"][0]["text"] == greedy
    assert completion(main, top_p=1e-300, ignore_eos=True)["choices"][0]["text"] == greedy
    assert main.engine.is_alive


def test_text_offsets_index_the_text_where_tokens_split_a_character(main):
    """One token per byte in the tiny vocabulary: "é" and "日" are 2 and 3 tokens whose texts alone are U+FFFD.
    Their offsets are those of the text (the pieces of a character share its index), streamed and not."""
    body = {"prompt": "aé日b", "echo": True, "logprobs": 1, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    lp = completion(main, **body)["choices"][0]["logprobs"]
    assert lp["text_offset"][:7] == [0, 1, 1, 2, 2, 2, 3] and lp["tokens"][0] == "a" and lp["tokens"][6] == "b"
    with httpx.stream("POST", main.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        events = sse_events(response)
    streamed = [o for e in events if e["choices"][0]["logprobs"] for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert streamed == lp["text_offset"]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert all(o <= len(text) for o in streamed) and lp["text_offset"] == sorted(lp["text_offset"])


@pytest.mark.parametrize("prompt, parts, want", [
    ([], [b"a", b"\xc3", b"\xa9", b"\xe6", b"\x97", b"\xa5", b"b"], [0, 1, 1, 2, 2, 2, 3]),   # "a\u00e9\u65e5b"
    ([], [b"x", b"\xe6", b"a"], [0, 1, 2]),                    # a cut character: one U+FFFD before "a"
    ([], [b"\xe6", b"\xe6", b"\x97", b"\xa5"], [0, 1, 1, 1]),   # U+FFFD then \u65e5
    ([b"a", b"\xe6"], [b"\x97", b"\xa5", b"b"], [0, 1, 2, 3, 4]),  # echo, completion decoded apart: "a" 3 x U+FFFD "b"
])
def test_text_offsets_follow_the_utf8_decoding_of_each_text(prompt, parts, want):
    from server.formatting import TextOffsets
    offsets = TextOffsets(0)
    got = [offsets.take(raw) for raw in prompt]
    if prompt:
        offsets.boundary()
    assert got + [offsets.take(raw) for raw in parts] == want


def test_chat_logprobs_and_content_parts(main):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 3,
            "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    response = main.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(entry["top_logprobs"]) == 2 for entry in content)
    # `bytes` are each token's own bytes: one byte per token in the tiny vocabulary (bar specials), also where
    # a token alone is part of a UTF-8 character and its text is U+FFFD (whose UTF-8 is 3 bytes)
    entries = content + [top for entry in content for top in entry["top_logprobs"]]
    assert any(e["token"] == "\ufffd" for e in entries)
    assert all(len(e["bytes"]) == 1 or e["token"].startswith("<") for e in entries), entries
    widest = main.post("/v1/chat/completions", {**body, "top_logprobs": 20, "max_tokens": 1})   # OpenAI's chat limit
    assert [len(e["top_logprobs"]) for e in widest.json()["choices"][0]["logprobs"]["content"]] == [20]


def test_steering_report_and_scale(main):
    full = completion(main, temperature=0, atv={"mode": "atv", "scale": 1.0})["atv"]
    half = completion(main, temperature=0, atv={"mode": "atv", "scale": 0.5})["atv"]
    off = completion(main, temperature=0, atv={"mode": "off"})["atv"]
    assert full["mode"] == "atv" and full["gate"] == 1.0 and full["generator_s"] > 0
    assert half["vector_norm"] == pytest.approx(full["vector_norm"] / 2, rel=1e-4)
    assert off == {"mode": "off", "scale": 1.0, "vector": None, "vector_norm": None, "gate": None,
                   "generator_s": None}


def test_default_mode_follows_the_generator(main, plain):
    assert completion(main)["atv"]["mode"] == "atv"
    assert completion(plain)["atv"]["mode"] == "off"
    assert_error(plain.post("/v1/completions", {"prompt": "x", "atv": {"mode": "atv"}}), 400, "atv.mode")
    assert_error(main.post("/v1/completions", {"prompt": "x", "atv": {"mode": "vector"}}), 400, "atv.vector")
    assert_error(main.post("/v1/completions", {"prompt": "x", "atv": {"vector_weight": 0.5}}), 400,
                 "atv.vector_weight")   # it weighs a named vector, and none is given: not silently ignored


def test_default_steering_serves_a_prompt_without_text_unsteered_and_asked_for_atv_refuses_it(main):
    before = scrape(main.url)
    both = completion(main, prompt=["Hello there", "  \n "], temperature=0)["choices"]
    assert [c["atv"]["mode"] for c in both] == ["atv", "off"] and all(c["finish_reason"] for c in both)
    after = scrape(main.url)
    for mode in ("atv", "off"):
        assert metric(after, "atv_requests_steering_total", mode=mode) - \
            metric(before, "atv_requests_steering_total", mode=mode) == 1
    with httpx.stream("POST", main.url + "/v1/completions", json={"prompt": " ", "max_tokens": 2, "stream": True},
                      timeout=60) as response:
        last = sse_events(response)[-1]["choices"][0]
    assert last["finish_reason"] and last["atv"]["mode"] == "off", last
    system_only = {"messages": [{"role": "system", "content": "Be brief."}], "max_tokens": 2}
    r = main.post("/v1/chat/completions", system_only)
    assert r.status_code == 200 and r.json()["choices"][0]["atv"]["mode"] == "off", r.text
    models = httpx.get(main.url + "/v1/models", timeout=10).json()["data"]
    atv_id = next(m["id"] for m in models if m["id"].endswith(":atv"))
    for asked in ({"atv": {"mode": "atv"}}, {"atv": {}}, {"model": atv_id}):   # asked for atv: refused
        assert_error(main.post("/v1/completions", {"prompt": "  ", **asked}), 400, "prompt")
        assert_error(main.post("/v1/chat/completions", {**system_only, **asked}), 400, "messages")
    blank_user = {"messages": [{"role": "user", "content": " \n"}], "max_tokens": 2, "atv": {"mode": "atv"}}
    error = assert_error(main.post("/v1/chat/completions", blank_user), 400, "messages")
    assert "reads the user messages, and they are empty" in error["message"], error
    for path, body in (("/v1/chat/completions", blank_user), ("/v1/completions", {"prompt": " ", "max_tokens": 2})):
        nothing = main.post(path, {**body, "atv": {"mode": "atv", "scale": 0.0}})   # scale 0: nothing to read
        assert nothing.status_code == 200, nothing.text


def test_tokenize_counts_what_generation_counts_and_detokenize_inverts_it(main):
    from tests.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    got = main.post("/tokenize", {"prompt": "Hello there", "return_token_strs": True}).json()
    assert got["tokens"] == tokenizer("Hello there").input_ids and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 512 and got["token_strs"] == [tokenizer.decode([t]) for t in got["tokens"]]
    assert completion(main, prompt="Hello there")["usage"]["prompt_tokens"] == got["count"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat = main.post("/tokenize", {"messages": messages}).json()
    used = main.post("/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    assert chat["count"] == used and chat["token_strs"] is None
    back = main.post("/detokenize", {"tokens": chat["tokens"]}).json()["prompt"]
    assert tokenizer(back, add_special_tokens=False).input_ids == chat["tokens"]
    assert main.post("/detokenize", {"tokens": got["tokens"]}).json()["prompt"] == tokenizer.decode(got["tokens"])
    for body, param in (({"prompt": "a", "messages": messages}, None), ({}, None),
                        ({"prompt": "a", "add_special_tokens": False}, "add_special_tokens"),
                        ({"messages": messages, "add_special_tokens": True}, "add_special_tokens"),
                        ({"prompt": "a", "add_generation_prompt": False}, None)):   # template options: messages
        assert_error(main.post("/tokenize", body), 400, param)
    assert main.post("/tokenize", {"prompt": "a", "add_special_tokens": True}).status_code == 200
    assert completion(main, stream_options={})["choices"]   # an empty stream_options without stream: as vLLM
    assert_error(main.post("/tokenize", {"messages": messages, "chat_template": "{{ x }}"}), 400,
                 "chat_template")   # vLLM's option not implemented here: refused, not dropped
    assert_error(main.post("/detokenize", {"tokens": [0, 10**6]}), 400, "tokens")
    assert_error(main.post("/tokenize", {"prompt": "a", "model": "nope"}), 404, "model")


def test_chat_template_options_shape_the_prompt_as_vllm(main):
    """add_generation_prompt, continue_final_message (an assistant prefill the completion continues) and
    chat_template_kwargs reach the template, for chat completions and /tokenize alike."""
    from tests.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    prefill = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    cases = ({"add_generation_prompt": False},
             {"add_generation_prompt": False, "continue_final_message": True},
             {"chat_template_kwargs": {"note": "Note: be brief."}})
    for options in cases:
        template = {"add_generation_prompt": options.get("add_generation_prompt", True),
                    "continue_final_message": options.get("continue_final_message", False),
                    **options.get("chat_template_kwargs", {})}
        want = tokenizer(tokenizer.apply_chat_template(prefill, tokenize=False, **template),
                         add_special_tokens=False).input_ids
        tokens = main.post("/tokenize", {"messages": prefill, **options}).json()["tokens"]
        reply = main.post("/v1/chat/completions", {"messages": prefill, "max_tokens": 1, **options})
        assert tokens == want and reply.json()["usage"]["prompt_tokens"] == len(want), options
    user_last = [{"role": "user", "content": "Complete: roses are"}]   # the reply's role is the continued message's
    reply = main.post("/v1/chat/completions", {"messages": user_last, "max_tokens": 1, **cases[1]}).json()
    assert reply["choices"][0]["message"]["role"] == "user"
    with httpx.stream("POST", main.url + "/v1/chat/completions", timeout=60, json={
            "messages": user_last, "max_tokens": 1, "stream": True, **cases[1]}) as response:
        assert sse_events(response)[0]["choices"][0]["delta"]["role"] == "user"
    assert main.post("/v1/chat/completions", {"messages": prefill, "max_tokens": 1}).json()[
        "choices"][0]["message"]["role"] == "assistant"
    continued = tokenizer.decode(main.post("/tokenize", {"messages": prefill, **cases[1]}).json()["tokens"])
    assert continued.endswith("The colour is") and "Note" not in continued
    assert tokenizer.decode(main.post("/tokenize", {"messages": prefill, **cases[2]}).json()["tokens"]).startswith(
        "Note: be brief.\n<|im_start|>user")
    for options, param in (({"continue_final_message": True}, "continue_final_message"),   # with the assistant opening
                           ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
                           ({"chat_template_kwargs": ["note"]}, "chat_template_kwargs"),
                           ({"add_generation_prompt": "no"}, "add_generation_prompt")):
        assert_error(main.post("/v1/chat/completions", {"messages": prefill, **options}), 400, param)
        assert_error(main.post("/tokenize", {"messages": prefill, **options}), 400, param)


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "top_k": 1.5}, "top_k"),
    ({"prompt": "x", "temperature": "0.5"}, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["ok", ""]}, "prompt.1"),
    ({}, "prompt"),
    ({"prompt": "x", "atv": {"mode": "sideways"}}, "atv.mode"),
    ({"prompt": "x", "atv": {"scale": 1e9}}, "atv.scale"),
    ({"prompt": "x", "atv": {"mode": "off", "extra": 1}}, "atv.extra"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 65}, "max_tokens"),          # over the server's limit (64)
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),   # without stream (vLLM: 400;
    # an empty {} passes, as there)
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "max_tokens": 0, "logprobs": 1}, "max_tokens"),   # 0 samples nothing: only with echo
    # logit processing out of its ranges (OpenAI's for the penalties and biases, vLLM's for the others)
    ({"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"prompt": "x", "presence_penalty": -3}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": False}, "frequency_penalty"),   # strict: false is not 0
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"prompt": "x", "logit_bias": {"5": False}}, "logit_bias.5"),
    ({"prompt": "x", "logit_bias": {"five": 1}}, "logit_bias.five"),
    ({"prompt": "x", "logit_bias": {"-5": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 1, "100000000": 1}}, "logit_bias"),   # outside the vocabulary
    ({"prompt": "x", "logit_bias": [5, 1]}, "logit_bias"),
    ({"prompt": "x", "stop_token_ids": [5, 100000000], "min_tokens": 1}, "stop_token_ids"),   # outside the vocabulary
    ({"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
    ({"prompt": "x", "allowed_token_ids": [5, 100000000]}, "allowed_token_ids"),   # outside the vocabulary
    ({"prompt": "x", "allowed_token_ids": [5, -1]}, "allowed_token_ids.1"),
    # OpenAI fields not implemented here: a non-neutral value is refused, never silently dropped
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "n": 2, "best_of": 3}, "best_of"),                 # only best_of == n is neutral
    ({"prompt": "x", "suffix": "tail"}, "suffix"),
])
def test_invalid_fields_are_400(main, body, param):
    assert_error(main.post("/v1/completions", body), 400, param)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc80"}]}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "\ud800"}]}, "messages.0.name"),
    ("/v1/completions", {"prompt": "x", "atv": {"examples": [{"input": "a\ud800", "output": "b"}]}},
     "atv.examples.0.input"),
    ("/v1/completions", {"prompt": "x", "user": "\udfff"}, "user"),
    ("/v1/completions", {"prompt": "x\ud800"}, "prompt"),
])
def test_unpaired_surrogates_are_400_on_every_text_field(main, path, body, param):
    """JSON can carry a lone UTF-16 surrogate, which no tokenizer encodes: every text field refuses it (it
    was a 500 from the tokenizer on chat content, and a failed generator batch on atv.examples)."""
    raw = json.dumps(body)   # ASCII JSON with the "\\ud800" escape (httpx's json= cannot encode a lone surrogate)
    error = assert_error(httpx.post(main.url + path, content=raw, headers={"content-type": "application/json"},
                                    timeout=60), 400)
    assert error["param"].startswith(param), error
    assert completion(main)["choices"]   # and the server goes on


def test_invalid_json_and_chat_fields_are_400(main):
    response = httpx.post(main.url + "/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    error = assert_error(response, 400, None)
    assert error["param"] is None and "not valid JSON at character 1" in error["message"], error
    for body, headers in ((b"", {"content-type": "application/json"}), (b"[1]", {"content-type": "application/json"}),
                          (b"prompt=x", {"content-type": "application/x-www-form-urlencoded"})):
        error = assert_error(httpx.post(main.url + "/v1/completions", content=body, headers=headers), 400)
        assert error["param"] is None and "must be a JSON object" in error["message"], (body, error)
    assert_error(main.post("/v1/chat/completions", {"messages": []}), 400, "messages")
    assert_error(main.post("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}), 400,
                 "messages.0.role")
    assert_error(main.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}),
                 400, "top_logprobs")
    user = [{"role": "user", "content": "x"}]
    assert_error(main.post("/v1/chat/completions", {"messages": user, "top_logprobs": 2}), 400, "top_logprobs")
    bad = main.post("/v1/chat/completions", {"messages": user, "top_logprobs": 2, "logprobs": "yes"})
    assert assert_error(bad, 400, "logprobs")["message"].startswith("logprobs: Input should be a valid boolean")
    for field, value in (("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]),
                         ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy"}),
                         ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}),
                         ("tool_choice", "required"), ("documents", [{"text": "d"}]), ("echo", True),
                         ("add_special_tokens", True), ("mm_processor_kwargs", {"a": 1}),
                         ("stop_token_ids", [10**8])):
        assert_error(main.post("/v1/chat/completions", {"messages": user, field: value}), 400, field)
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "response_format": {"type": "text"},
               "tools": [], "tool_choice": "auto", "max_tokens": 2, "modalities": ["text"], "service_tier": "auto",
               "reasoning_effort": "low"}   # what some clients send by default; the last two change nothing here
    assert main.post("/v1/chat/completions", {"messages": user, **neutral}).status_code == 200
    assert completion(main, best_of=1, suffix="", frequency_penalty=0, max_tokens=2)["choices"]
    unsupported = (("guided_choice", ["a"]), ("use_beam_search", True), ("spaces_between_special_tokens", False),
                   ("response_format", {"type": "json_object"}), ("structured_outputs", {"choice": ["a", "b"]}),
                   ("logprob_token_ids", [5]), ("return_tokens_as_token_ids", True), ("return_token_ids", True),
                   ("length_penalty", 2.0), ("priority", 1), ("thinking_token_budget", 5),
                   ("repetition_detection", {"max_pattern_size": 4}), ("vllm_xargs", {"k": 1}),
                   ("kv_transfer_params", {"k": 1}), ("guided_whitespace_pattern", " "))
    for field, value in unsupported:   # vLLM's extensions not implemented here: never silently dropped
        assert_error(main.post("/v1/completions", {"prompt": "x", field: value}), 400, field)
        assert_error(main.post("/v1/chat/completions", {"messages": user, field: value}), 400, field)
    for field, value in (("add_special_tokens", False), ("prompt_embeds", "AAAA")):   # completions' own
        assert_error(main.post("/v1/completions", {"prompt": "x", field: value}), 400, field)
    vllm_neutral = {"min_tokens": 0, "repetition_penalty": 1.0, "min_p": 0, "include_stop_str_in_output": False,
                    "skip_special_tokens": True, "use_beam_search": False, "guided_json": None,
                    "response_format": {"type": "text"}, "bad_words": [], "return_token_ids": False,
                    "length_penalty": 1.0, "priority": 0, "thinking_token_budget": -1, "add_special_tokens": True}
    assert completion(main, max_tokens=2, **vllm_neutral)["choices"]
    # also neutral: best_of equal to n (every candidate returned), biases of 0, null logit processing
    assert len(completion(main, n=2, best_of=2, logit_bias={"5": 0, "7": 0.0}, max_tokens=2)["choices"]) == 2
    nulls = {"logit_bias": None, "frequency_penalty": None, "presence_penalty": None, "repetition_penalty": None,
             "min_p": None}
    assert completion(main, max_tokens=2, **nulls)["choices"]


def test_logit_bias_penalties_and_min_p_reach_the_sampler(main):
    """A bias of +100 makes its token every greedy token (completions and chat), while the logprobs reported stay
    the model's own; the penalties and min_p are accepted and applied (their arithmetic: tests/test_engine.py)."""
    token = main.post("/detokenize", {"tokens": [7]}).json()["prompt"]
    assert token
    forced = completion(main, temperature=0, logit_bias={"7": 100}, logprobs=1, atv={"mode": "off"})["choices"][0]
    assert forced["logprobs"]["tokens"] == [token] * 4 and forced["text"] == token * 4
    assert all(lp > -100 and lp < 0 for lp in forced["logprobs"]["token_logprobs"])   # raw: no +100 in them
    plain = completion(main, temperature=0, logprobs=1, atv={"mode": "off"})["choices"][0]
    assert plain["logprobs"]["tokens"] != [token] * 4
    chat = main.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                              "temperature": 0, "logit_bias": {"7": 100}, "atv": {"mode": "off"}})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == token * 3
    greedy = dict(temperature=0, max_tokens=8, logprobs=0, atv={"mode": "off"})
    plain = completion(main, **greedy)["choices"][0]["logprobs"]["tokens"]
    # negative penalties reward what the output already holds: the first token, ever more
    rewarded = completion(main, **greedy, frequency_penalty=-2, presence_penalty=-2)["choices"][0]["logprobs"]["tokens"]
    assert len(set(plain)) > 1 and rewarded == [plain[0]] * 8, (plain, rewarded)
    assert completion(main, **greedy, repetition_penalty=0.01)["choices"][0]["logprobs"]["tokens"] != plain
    # min_p 1 keeps only the most likely token: sampling at temperature 1 becomes greedy
    sampled = [completion(main, **{**greedy, "temperature": 1.0}, seed=s, min_p=1.0)["choices"][0]["logprobs"]["tokens"]
               for s in range(3)]
    assert sampled == [plain] * 3
    assert completion(main, **{**greedy, "temperature": 1.0}, seed=0)["choices"][0]["logprobs"]["tokens"] != plain
    # allowed_token_ids: sampled at temperature 1, every token is one of the allowed
    labels = {main.post("/detokenize", {"tokens": [t]}).json()["prompt"] for t in (9, 13)}
    for s in range(3):
        tokens = completion(main, **{**greedy, "temperature": 1.0}, seed=s,
                            allowed_token_ids=[9, 13])["choices"][0]["logprobs"]["tokens"]
        assert set(tokens) <= labels and len(tokens) == 8, tokens


def test_bad_words_never_appear_in_the_output(main):
    """vLLM's bad_words: the plain greedy output's first non-space token, banned, is in no token of the output
    (greedy or sampled, completions and chat); a blank word is a 400 on its item."""
    greedy = dict(temperature=0, max_tokens=8, logprobs=0, atv={"mode": "off"}, ignore_eos=True)
    plain = completion(main, **greedy)["choices"][0]["logprobs"]["tokens"]
    word = next(t for t in plain if t.strip())
    banned = completion(main, **greedy, bad_words=[word])["choices"][0]["logprobs"]["tokens"]
    assert word not in banned and banned != plain, (plain, banned)
    for seed in range(3):
        sampled = completion(main, **{**greedy, "temperature": 1.0}, seed=seed, bad_words=[word, "zz"])
        assert word not in sampled["choices"][0]["logprobs"]["tokens"]
    chat = {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "max_tokens": 8,
            "ignore_eos": True, "atv": {"mode": "off"}, "logprobs": True}
    tokens = [e["token"] for e in main.post("/v1/chat/completions", {**chat, "bad_words": [word]}).json()[
        "choices"][0]["logprobs"]["content"]]
    assert word not in tokens and len(tokens) == 8
    assert_error(main.post("/v1/completions", {"prompt": "x", "bad_words": [" "]}), 400, "bad_words.0")
    # allowed "a", "b"; bad words "ab" and "aa": once "a" is out nothing may follow (the engine used to emit token 0)
    from tests.tiny import make_tokenizer
    a, b = make_tokenizer()("ab", add_special_tokens=False).input_ids
    stuck = dict(prompt="x", max_tokens=4, atv={"mode": "off"}, allowed_token_ids=[a, b], logit_bias={str(a): 100},
                 bad_words=["ab", "aa"])
    error = assert_error(main.post("/v1/completions", stuck), 400, "bad_words")
    assert "no token to sample after 1 output token:" in error["message"]
    with httpx.stream("POST", main.url + "/v1/completions", json={**stuck, "stream": True}, timeout=30) as response:
        events = sse_events(response)
    assert events[0]["choices"][0]["text"] == "a" and events[-1]["error"]["param"] == "bad_words"
    assert completion(main, prompt="x", allowed_token_ids=[a, b], max_tokens=4, temperature=0, atv={"mode": "off"})


def test_vllm_prompt_logprobs_score_each_prompt_token(main):
    """vLLM's prompt_logprobs: per prompt token null (the first), else {token id: logprob, rank, decoded_token},
    the token's own entry (the values echo with logprobs reports) and the k most likely at ranks 1..k; chat: the
    templated prompt's, at the top level; never mixed into `logprobs`; not with stream."""
    body = dict(prompt="Hello there, general", max_tokens=2, temperature=0, atv={"mode": "off"})
    ids = main.post("/tokenize", {"prompt": body["prompt"]}).json()["tokens"]
    echoed = completion(main, **body, echo=True, logprobs=2)["choices"][0]["logprobs"]
    got = completion(main, **body, prompt_logprobs=2)["choices"][0]
    assert got["logprobs"] is None                                  # no echo: the prompt is not in `logprobs`
    scored = got["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    for i, (entry, token) in enumerate(zip(scored[1:], ids[1:]), start=1):
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(echoed["token_logprobs"][i], abs=1e-5)
        assert own["decoded_token"] == echoed["tokens"][i]
        best = [v for v in entry.values() if v["rank"] <= 2]
        assert sorted(v["rank"] for v in best) == [1, 2] and len(entry) == (2 if own["rank"] <= 2 else 3)
        more_likely = sum(v["logprob"] > own["logprob"] for v in entry.values())
        assert own["rank"] == 1 + more_likely if own["rank"] <= 3 else more_likely == 2
        first, second = sorted(best, key=lambda v: v["rank"])
        assert first["logprob"] >= second["logprob"] >= own["logprob"]
    assert {len(e) for e in completion(main, **body, prompt_logprobs=0)["choices"][0]["prompt_logprobs"][1:]} == {1}
    assert completion(main, **body)["choices"][0]["prompt_logprobs"] is None
    mixed = completion(main, **body, echo=True, logprobs=1, prompt_logprobs=3)["choices"][0]
    assert all(len(t) <= 2 for t in mixed["logprobs"]["top_logprobs"][1:])   # echo keeps its own k
    assert all(len(e) >= 3 for e in mixed["prompt_logprobs"][1:])
    chat = main.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2,
                                              "prompt_logprobs": 1}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    assert_error(main.post("/v1/completions", {**body, "prompt_logprobs": 1, "stream": True}), 400, "prompt_logprobs")


def test_truncate_prompt_tokens_keeps_the_last_tokens(main, monkeypatch):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens, answered exactly as the same k token ids sent
    alone (greedy text, echo, the generator's gate and vector read from their text); chat truncates the templated
    conversation; -1 keeps what the server takes; 0 or over the context: 400; the character bound still holds."""
    text = "the start is cut away; " * 30                   # 690 tokens: over the context of 512, refused whole
    assert_error(main.post("/v1/completions", {"prompt": text}), 413, "prompt")
    kept = main.post("/tokenize", {"prompt": text[-20:]}).json()["tokens"]   # (one token per byte here)
    assert len(kept) == 20
    body = dict(max_tokens=6, temperature=0, echo=True, logprobs=0, atv={})
    cut = completion(main, prompt=text, truncate_prompt_tokens=20, **body)
    alone = completion(main, prompt=kept, **body)
    assert cut["usage"]["prompt_tokens"] == 20
    for key in ("text", "logprobs"):
        assert cut["choices"][0][key] == alone["choices"][0][key], key
    assert cut["choices"][0]["text"].startswith(text[-20:])
    steered = [{k: r["choices"][0]["atv"][k] for k in ("gate", "vector_norm")} for r in (cut, alone)]
    assert steered[0] == steered[1] and steered[0]["vector_norm"] > 0
    whole = completion(main, prompt="Hello there", max_tokens=4, temperature=0)
    assert completion(main, prompt="Hello there", max_tokens=4, temperature=0,
                      truncate_prompt_tokens=-1)["choices"][0]["text"] == whole["choices"][0]["text"]
    chat = main.post("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 2,
                                              "truncate_prompt_tokens": 30})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == 30, chat.text
    for bad in (0, 513, -2, 1.5):
        assert_error(main.post("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": bad}), 400,
                     "truncate_prompt_tokens")
    huge = "x" * (main.engine.limits.max_prompt_chars + 1)   # one request's tokenizer work stays bounded
    assert_error(main.post("/v1/completions", {"prompt": huge, "truncate_prompt_tokens": 8}), 413, "prompt")
    assert_error(main.post("/v1/completions", {"prompt": text, "truncate_prompt_tokens": -1}), 413, "prompt")  # fills
    monkeypatch.setattr(main.state.settings, "max_prompt_tokens", 100)   # -1: as many as the server takes
    assert completion(main, prompt=text, truncate_prompt_tokens=-1, max_tokens=2)["usage"]["prompt_tokens"] == 100


def test_sampling_fields_left_out_default_to_the_models_generation_config(tmp_path):
    """--generation-config auto (vLLM's default): a generation_config.json with top_k 1 makes requests that leave
    top_k out greedy even at temperature 1, and its repetition_penalty applies; a request's own value wins;
    --generation-config vllm ignores the file."""
    from transformers import GenerationConfig
    model = make_tiny_model_dir(tmp_path / "model")
    GenerationConfig(do_sample=True, top_k=1, repetition_penalty=50.0, bos_token_id=1,
                     eos_token_id=2).save_pretrained(model)
    body = dict(prompt="a a a a a a a a", max_tokens=16, logprobs=0, atv={"mode": "off"}, ignore_eos=True)

    def tokens(served, **extra):
        return completion(served, **{**body, **extra})["choices"][0]["logprobs"]["tokens"]

    with serving(async_engine(model, None), make_settings()) as served:
        assert served.state.sampling_defaults == {"top_k": 1, "repetition_penalty": 50.0}
        penalised = tokens(served, temperature=0)
        assert penalised == tokens(served, temperature=0, repetition_penalty=50.0)
        plain = tokens(served, temperature=0, repetition_penalty=1.0)               # the request's value wins
        assert plain != penalised
        assert [tokens(served, temperature=1.0, seed=s) for s in range(3)] == [penalised] * 3   # top_k 1: greedy
        own = [tokens(served, temperature=1.0, seed=s, top_k=-1) for s in range(3)]
        assert len({tuple(t) for t in own}) > 1                                               # top_k -1 wins
    with serving(async_engine(model, None), make_settings(generation_config="vllm")) as served:
        assert served.state.sampling_defaults == {}
        assert tokens(served, temperature=0) == plain
        assert len({tuple(tokens(served, temperature=1.0, seed=s)) for s in range(3)}) > 1


def test_override_generation_config_merges_over_the_models_and_caps_max_tokens(tmp_path):
    """--override-generation-config (vLLM's): merged over the model's generation_config with auto, alone with
    vllm. The model's max_new_tokens is the default max_tokens of a chat (completions keep OpenAI's 16); the
    override's is that default too and cuts every request's max_tokens to it."""
    from transformers import GenerationConfig
    model = make_tiny_model_dir(tmp_path / "model")
    GenerationConfig(do_sample=True, top_k=1, repetition_penalty=50.0, max_new_tokens=5, bos_token_id=1,
                     eos_token_id=2).save_pretrained(model)
    chat = {"messages": [{"role": "user", "content": "Hello there"}], "ignore_eos": True, "atv": {"mode": "off"}}
    repeated = dict(prompt="a a a a a a a a", max_tokens=16, logprobs=0, atv={"mode": "off"}, ignore_eos=True)

    def count(served, path, **body):
        response = served.post(path, {**(chat if "chat" in path else {"prompt": "Hello there", "ignore_eos": True}),
                                      **body})
        assert response.status_code == 200, response.text
        return response.json()["usage"]["completion_tokens"]

    merged = make_settings(override_generation_config={"repetition_penalty": 1.0, "temperature": 0})
    with serving(async_engine(model, None), merged) as served:
        assert served.state.sampling_defaults == {"top_k": 1, "repetition_penalty": 1.0, "temperature": 0}
        assert (served.state.default_max_tokens, served.state.max_tokens_cap) == (5, None)
        assert count(served, "/v1/chat/completions") == 5
        assert count(served, "/v1/chat/completions", max_tokens=9) == 9                 # not a cap
        assert count(served, "/v1/completions") == 16
        tokens = [completion(served, **repeated, **extra)["choices"][0]["logprobs"]["tokens"]
                  for extra in ({}, {"repetition_penalty": 1.0}, {"repetition_penalty": 50.0})]
        assert tokens[0] == tokens[1] != tokens[2]                          # the override's 1.0, not the model's 50
    alone = make_settings(generation_config="vllm", override_generation_config={"max_new_tokens": 3})
    with serving(async_engine(model, None), alone) as served:
        assert served.state.sampling_defaults == {} and served.state.max_tokens_cap == 3
        assert [count(served, "/v1/chat/completions"), count(served, "/v1/chat/completions", max_tokens=9),
                count(served, "/v1/completions"), count(served, "/v1/completions", max_tokens=2),
                count(served, "/v1/completions", max_tokens=1000)] == [3, 3, 3, 2, 3]    # above --max-tokens 64: cut
    with pytest.raises(ValidationError, match="top_p must be"):
        make_settings(override_generation_config={"top_p": 1.5})


def test_min_tokens_include_stop_str_and_special_tokens_reach_the_engine(main):
    eos = main.post("/detokenize", {"tokens": [2]}).json()["prompt"]    # the tiny tokenizer's </s>
    greedy = dict(temperature=0, max_tokens=6, atv={"mode": "off"})
    plain = completion(main, **greedy)["choices"][0]["text"]
    stop = plain[2]
    cut = completion(main, **greedy, stop=stop)["choices"][0]
    kept = completion(main, **greedy, stop=stop, include_stop_str_in_output=True)["choices"][0]
    assert cut["text"] == plain[:plain.index(stop)] and kept["text"] == cut["text"] + stop
    assert cut["finish_reason"] == kept["finish_reason"] == "stop"
    # min_tokens: EOS cannot end it early, even when it is the only token the bias allows
    forced = dict(greedy, logit_bias={"2": 100})
    assert completion(main, **forced)["choices"][0]["text"] == ""                       # EOS first: nothing
    assert completion(main, **forced, min_tokens=3)["usage"]["completion_tokens"] == 4   # 3 others, then EOS
    shown = completion(main, **forced, ignore_eos=True, skip_special_tokens=False)["choices"][0]["text"]
    assert shown == eos * 6 and eos
    assert_error(main.post("/v1/completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 3}), 400, "min_tokens")
    assert_error(main.post("/v1/completions", {"prompt": "x", "min_tokens": -1}), 400, "min_tokens")
    assert_error(main.post("/v1/completions", {"prompt": "x", "skip_special_tokens": "no"}), 400, "skip_special_tokens")


def test_unknown_model_and_path_are_404(main):
    assert_error(main.post("/v1/completions", {"prompt": "x", "model": "gpt-9"}), 404, "model")
    assert_error(httpx.get(main.url + "/v1/nothing"), 404)


def test_prompt_too_long_is_413(main, monkeypatch):
    assert_error(main.post("/v1/completions", {"prompt": "x" * 500, "max_tokens": 16}), 413)  # 516 > 512
    assert_error(main.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 520}]}), 413,
                 "messages")
    fits_alone = {"messages": [{"role": "user", "content": "x" * 490}], "max_tokens": 30}   # refused at submit
    assert_error(main.post("/v1/chat/completions", fits_alone), 413, "messages")
    # no max_tokens: OpenAI's 16, clamped to the room the prompt leaves (as vLLM) instead of refused
    near = main.post("/v1/completions", {"prompt": "x" * 500, "ignore_eos": True})
    assert near.status_code == 200, near.text
    usage = near.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 512 and usage["completion_tokens"] < 16, usage
    assert completion(main, prompt="x" * 5, max_tokens=None, ignore_eos=True)["usage"]["completion_tokens"] == 16
    assert_error(main.post("/v1/completions", {"prompt": "x" * 512}), 413, "prompt")   # no room left at all
    monkeypatch.setattr(main.state.settings, "max_prompt_tokens", 10)
    assert_error(main.post("/v1/completions", {"prompt": "x" * 11}), 413, "prompt")
    assert completion(main, prompt="x" * 10)["choices"]


def test_queue_full_is_429_with_retry_after(main, monkeypatch):
    engine, release = main.engine, threading.Event()
    drain = engine._drain_inbox

    def held():   # the engine thread takes nothing from its inbox until released: submitted requests stay queued
        release.wait(30)
        drain()

    monkeypatch.setattr(engine, "_drain_inbox", held)
    try:
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(main.post, "/v1/completions", {"prompt": "y", "n": 4, "max_tokens": 2})
            eventually(lambda: engine._pending == 4)   # its 4 choices fill the queue of 4
            response = main.post("/v1/completions", {"prompt": "z", "max_tokens": 2})
            assert_error(response, 429)
            assert response.headers["retry-after"] == "1"
            release.set()
            assert queued.result().status_code == 200   # nobody else harmed
    finally:
        release.set()
    eventually(lambda: idle(main))
    assert completion(main)["choices"]


def test_api_key(main, monkeypatch):
    monkeypatch.setattr(main.state.settings, "api_key", SecretStr("sekret"))
    body = {"prompt": "x", "max_tokens": 2}
    missing = main.post("/v1/completions", body)
    assert_error(missing, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(main.post("/v1/completions", body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(main.url + "/v1/models"), 401)
    assert main.post("/v1/completions", body, headers={"Authorization": "Bearer sekret"}).status_code == 200
    for path, tokenizer_body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        assert_error(main.post(path, tokenizer_body), 401)
        assert main.post(path, tokenizer_body, headers={"Authorization": "Bearer sekret"}).status_code == 200
    for open_path in ("/health", "/ready", "/metrics", "/version"):
        assert httpx.get(main.url + open_path).status_code == 200
    import tomllib
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert httpx.get(main.url + "/version").json() == {"version": declared}


def test_generation_failure_is_500_and_harms_nobody(main, monkeypatch):
    engine = main.engine.engine
    real = engine.generator

    class NonFinite:  # a generator whose vectors are NaN
        config = real.config
        format_input = staticmethod(real.format_input)

        def __call__(self, texts):
            out = real(texts)
            return SimpleNamespace(vectors=out.vectors * float("nan"), gates=out.gates)

    monkeypatch.setattr(engine, "generator", NonFinite())
    error = assert_error(main.post("/v1/completions", {"prompt": "x", "atv": {"mode": "atv"}}), 500)
    assert "non-finite" in error["message"]
    with httpx.stream("POST", main.url + "/v1/completions", timeout=30,
                      json={"prompt": "x", "stream": True, "atv": {"mode": "atv"}}) as response:
        events = sse_events(response)
    assert "non-finite" in events[-1]["error"]["message"]
    assert completion(main, atv={"mode": "off"})["choices"]  # unsteered requests still work meanwhile
    monkeypatch.setattr(engine, "generator", real)
    assert completion(main)["atv"]["mode"] == "atv"
    assert httpx.get(main.url + "/health").status_code == 200


def test_timeout_aborts_with_504(main, monkeypatch, slow_steps):
    monkeypatch.setattr(main.state.settings, "request_timeout", 0.3)
    body = {"prompt": "x", "max_tokens": 64, "ignore_eos": True}
    error = assert_error(main.post("/v1/completions", body), 504)
    assert error["code"] == "request_timeout"
    with httpx.stream("POST", main.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1]["error"]["code"] == "request_timeout"
    eventually(lambda: idle(main))


def test_an_unexpected_error_is_one_500_and_the_connection_stays_usable(main, monkeypatch, caplog):
    """A bug in a route is an OpenAI-style 500, logged once (not again by uvicorn), and the client's keep-alive
    connection serves its next request."""
    import logging

    from server import openai_api

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(openai_api, "completion_choices", broken)
    with httpx.Client(base_url=main.url, timeout=60) as client, caplog.at_level(logging.ERROR):
        error = assert_error(client.post("/v1/completions", json={"prompt": "x"}), 500)
        assert error["message"] == "internal server error: RuntimeError" and error["type"] == "server_error"
        monkeypatch.undo()
        for _ in range(3):   # the same pooled connection
            assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is RuntimeError]
    assert len(logged) == 1 and logged[0].name == "atv.server", [(r.name, r.getMessage()) for r in logged]


def test_draining_refuses_new_work(main, monkeypatch):
    assert httpx.head(main.url + "/ready").status_code == 200
    monkeypatch.setattr(main.state, "draining", True)
    assert httpx.get(main.url + "/ready").status_code == 503
    assert httpx.head(main.url + "/ready").status_code == 503   # HEAD (load balancers): the same status
    assert httpx.get(main.url + "/health").status_code == 200
    assert httpx.head(main.url + "/health").status_code == 200
    assert_error(main.post("/v1/completions", {"prompt": "x"}), 503)


def test_loading_app_answers_probes(assets):
    with serving(None, make_settings()) as served:
        assert httpx.get(served.url + "/health").status_code == 200
        assert httpx.get(served.url + "/ready").json() == {"status": "loading"}
        assert_error(served.post("/v1/completions", {"prompt": "x"}), 503)
        assert httpx.get(served.url + "/v1/models").json()["data"][0]["id"] == "tiny"
        assert httpx.get(served.url + "/v1/models/tiny").json()["id"] == "tiny"   # client.models.retrieve


def test_dead_engine_fails_health(assets):
    engine = async_engine(assets.model, None)

    def broken():
        raise RuntimeError("simulated engine fault")

    engine.engine.has_work = broken
    with serving(engine, make_settings()) as served:
        eventually(lambda: engine.error is not None)
        assert httpx.get(served.url + "/health").status_code == 503
        assert httpx.get(served.url + "/ready").status_code == 503
        assert httpx.head(served.url + "/health").status_code == 503
        assert_error(served.post("/v1/completions", {"prompt": "x"}), 503)
        assert metric(scrape(served.url), "atv_engine_up") == 0


# ---- disconnects --------------------------------------------------------------------------------
def test_stream_disconnect_frees_the_slot(main, slow_steps):
    before = scrape(main.url)
    body = {"prompt": "Tell me", "max_tokens": 64, "ignore_eos": True, "stream": True, "atv": {"mode": "atv"}}
    with httpx.Client(timeout=30) as client, client.stream("POST", main.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()  # held: dropping the iterator would close the response
        assert next(lines).startswith("data: {")  # one token streamed
        def steering_one():  # the gauges follow the engine thread, which updates them after each step
            during = scrape(main.url)
            return (metric(during, "atv_vector_slots_used") == 1 and metric(during, "atv_num_requests_running") == 1
                    and metric(during, "atv_kv_cache_usage") > 0)

        eventually(steering_one, timeout=2)
    eventually(lambda: idle(main), timeout=5)
    after = scrape(main.url)
    assert metric(after, "atv_client_disconnects_total") == metric(before, "atv_client_disconnects_total") + 1
    aborts = metric(after, "atv_requests_finished_total", finish_reason="abort")
    assert aborts == metric(before, "atv_requests_finished_total", finish_reason="abort") + 1
    generated = metric(after, "atv_generation_tokens_total") - metric(before, "atv_generation_tokens_total")
    assert generated < 64


def test_non_streaming_disconnect_aborts(main, slow_steps):
    before = scrape(main.url)
    with pytest.raises(httpx.ReadTimeout):
        main.post("/v1/completions", {"prompt": "x", "max_tokens": 64, "ignore_eos": True}, timeout=0.4)
    eventually(lambda: idle(main), timeout=5)
    after = scrape(main.url)
    assert metric(after, "atv_client_disconnects_total") == metric(before, "atv_client_disconnects_total") + 1
    generated = metric(after, "atv_generation_tokens_total") - metric(before, "atv_generation_tokens_total")
    assert generated < 64


# ---- metrics ------------------------------------------------------------------------------------
def test_metrics_count_known_requests(main):
    before = scrape(main.url)
    tokenizer = make_tokenizer()  # the served one belongs to the engine's threads
    prompts = ["one", "two two", "three three three"]
    for prompt in prompts:
        completion(main, prompt=prompt, max_tokens=4, ignore_eos=True, atv={"mode": "off"})
    after = scrape(main.url)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("atv_requests_finished_total", finish_reason="length") == 3
    assert delta("atv_generation_tokens_total") == 12
    assert delta("atv_prompt_tokens_total") == sum(len(tokenizer(p).input_ids) for p in prompts)
    assert delta("atv_http_requests_total", status="200") == 3
    assert delta("atv_requests_steering_total", mode="off") == 3
    assert delta("atv_e2e_request_latency_seconds_count") == 3
    assert delta("atv_time_to_first_token_seconds_count") == 3
    assert delta("atv_request_queue_time_seconds_count") == 3
    assert delta("atv_inter_token_latency_seconds_count") == 9
    assert delta("atv_step_duration_seconds_count", phase="prefill") == 3
    assert delta("atv_step_duration_seconds_count", phase="decode") == 9
    assert delta("atv_batch_size_count") == 12
    assert metric(after, "atv_engine_up") == 1
    assert metric(after, "atv_num_requests_running") == 0 and metric(after, "atv_vector_slots_used") == 0
    names = {name for name, _ in after}
    assert {"atv_vector_generation_seconds_count", "atv_num_requests_waiting"} <= names


def test_every_series_the_deploy_files_query_is_exported(main):
    from tests.test_deploy import KNOWN_SERIES   # what the Grafana dashboard and the alert rules may use
    completion(main, max_tokens=2)
    names = {name for name, _ in scrape(main.url)}
    assert KNOWN_SERIES <= names, sorted(KNOWN_SERIES - names)


def test_prompt_tokens_count_once_per_prompt_as_usage_does(main):
    before = scrape(main.url)
    body = completion(main, prompt=["one", "two two"], n=2, max_tokens=2, atv={"mode": "off"})
    counted = metric(scrape(main.url), "atv_prompt_tokens_total") - metric(before, "atv_prompt_tokens_total")
    assert counted == body["usage"]["prompt_tokens"] == sum(len(make_tokenizer()(p).input_ids) for p in ("one", "two two"))


def test_more_choices_than_the_queue_holds_is_400_not_a_429_forever(main):
    # main's engine queues 4 requests: 5 choices could never all be admitted, however long a client retried
    for body in ({"prompt": "x", "n": 5}, {"prompt": ["a", "b", "c"], "n": 2}):
        error = assert_error(main.post("/v1/completions", {**body, "max_tokens": 2}), 400, "n")
        assert "takes at most 4 (its waiting queue holds 4)" in error["message"], error
    chat = main.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 5})
    assert_error(chat, 400, "n")
    assert len(completion(main, prompt="x", n=4, max_tokens=2)["choices"]) == 4


def test_prefix_cache_counters_count_a_repeated_prompt(main):
    tokenizer = make_tokenizer()
    prompt = "a system prompt long enough to fill a few KV blocks of sixteen tokens each: " * 2
    n = len(tokenizer(prompt).input_ids)
    before = scrape(main.url)
    for _ in range(2):
        completion(main, prompt=prompt, max_tokens=2, ignore_eos=True, atv={"mode": "off"})
    after = scrape(main.url)
    hits = metric(after, "atv_prefix_cache_hits_total") - metric(before, "atv_prefix_cache_hits_total")
    assert metric(after, "atv_prefix_cache_queries_total") - metric(before, "atv_prefix_cache_queries_total") == 2 * n
    assert hits == (n - 1) // 16 * 16 > 0    # the second request reuses every full block before its last token
    # cache_salt: the same prompt under another salt finds nothing; a second request with that salt finds it all
    salted = prompt.replace("system", "salted")
    for salt, want in (("tenant-a", 0), ("tenant-b", 0), ("tenant-b", hits), (None, 0)):
        before = scrape(main.url)
        completion(main, prompt=salted, max_tokens=2, ignore_eos=True, atv={"mode": "off"},
                   **({"cache_salt": salt} if salt else {}))
        found = metric(scrape(main.url), "atv_prefix_cache_hits_total") - metric(before, "atv_prefix_cache_hits_total")
        assert found == want, (salt, found)
    assert_error(main.post("/v1/completions", {"prompt": "x", "cache_salt": ""}), 400, "cache_salt")


def test_http_statuses_are_counted(main):
    before = scrape(main.url)
    main.post("/v1/completions", {"prompt": ""})
    main.post("/v1/completions", {"prompt": "x", "model": "nope"})
    httpx.get(main.url + "/health")  # probes are not API traffic
    after = scrape(main.url)
    for status in ("400", "404"):
        assert metric(after, "atv_http_requests_total", status=status) == \
            metric(before, "atv_http_requests_total", status=status) + 1


# ---- fuzzing ------------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_errors(main, monkeypatch):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    monkeypatch.setattr(main.state.settings, "max_tokens", 4)
    monkeypatch.setattr(main.state.settings, "max_prompt_tokens", 64)
    schema = schemathesis.openapi.from_url(main.url + "/openapi.json")
    both = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for path, method, modes in [("/v1/completions", "POST", both), ("/v1/chat/completions", "POST", both),
                                ("/v1/models", "GET", both[:1])]:  # a GET without parameters has no negative case
        operation = schema[path][method]
        for mode in modes:
            @settings(max_examples=30, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode).map(tame) if mode == both[0] else operation.as_strategy(mode))
            def check(case):
                response = case.call(base_url=main.url, timeout=30)
                assert response.status_code < 500, (case.body, response.status_code, response.text[:500])

            check()
    assert httpx.get(main.url + "/health").status_code == 200
    eventually(lambda: idle(main))


NOT_IMPLEMENTED = ("best_of", "suffix", "response_format", "tools", "tool_choice", "functions", "function_call",
                   "chat_template", "documents", "mm_processor_kwargs", "spaces_between_special_tokens", "use_beam_search", "guided_json", "guided_regex",
                   "guided_choice", "guided_grammar")


def tame(case):
    """Valid bodies that reach the engine: no foreign model name, small whole max_tokens, min_tokens within them,
    stop token ids in the vocabulary; fields implemented only at their neutral values left out."""
    if isinstance(case.body, dict):
        case.body.pop("model", None)
        for key in NOT_IMPLEMENTED + (("echo", "add_special_tokens") if "messages" in case.body else ()):
            case.body.pop(key, None)   # neutral values only; anything else stops at the schema, not the engine
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), (int, float)):
                case.body[key] = int(min(max(case.body[key], 1), 4))
        if isinstance(case.body.get("min_tokens"), int):    # at most the smallest max_tokens: reaches the engine
            case.body["min_tokens"] = min(max(case.body["min_tokens"], 0), 1)
        ids = case.body.get("stop_token_ids")
        if isinstance(ids, list) and all(isinstance(t, int) and t >= 0 for t in ids):   # inside the tiny vocabulary
            case.body["stop_token_ids"] = [t % 256 for t in ids]
    return case


# ---- settings and the command line --------------------------------------------------------------
def test_settings_flags_beat_environment(monkeypatch):
    monkeypatch.setenv("ATV_MAX_RUNNING", "3")
    monkeypatch.setenv("ATV_PORT", "9001")
    monkeypatch.setenv("ATV_API_KEY", "from-env")
    monkeypatch.setenv("ATV_OVERRIDE_GENERATION_CONFIG", '{"top_p": 0.5}')
    settings = parse_settings(["--port", "9002", "--log-prompts", "--model", "some/model"])
    assert (settings.max_running, settings.port, settings.model, settings.log_prompts) == (3, 9002, "some/model", True)
    assert settings.override_generation_config == {"top_p": 0.5}
    flag = parse_settings(["--override-generation-config", '{"top_k": 40, "max_new_tokens": 8}'])
    assert flag.override_generation_config == {"top_k": 40, "max_new_tokens": 8}
    assert settings.api_key.get_secret_value() == "from-env" and settings.model_id == "some/model"
    with pytest.raises(SystemExit):
        parse_settings(["--port", "not-a-port"])


@pytest.mark.parametrize("argv, env, said", [
    (["--port", "x"], {}, "atv serve: error: --port: Input should be a valid integer"),
    ([], {"ATV_PORT": "x"}, "atv serve: error: ATV_PORT: "),                 # names where the bad value came from
    (["--device", "gpu"], {}, "--device: use auto, cpu, cuda or cuda:N (got 'gpu')"),
    (["--dtype", "fp8"], {}, "--dtype: Input should be 'auto'"),
    ([], {"ATV_API_KEY": " "}, "ATV_API_KEY: is empty: unset it to serve without a key"),
    (["--device", "cpu", "--device-map", "auto"], {}, "with device cpu leave it out"),
    (["--override-generation-config", '{"temperature": 1e400}'], {}, "temperature must be a finite number, got inf"),
    ([], {"ATV_OVERRIDE_GENERATION_CONFIG": '{"do_sample": true}'}, "'do_sample' is not one of temperature, top_p"),
    (["--override-generation-config", "{top_k: 4}"], {}, "--override-generation-config: is not JSON"),
])
def test_bad_settings_exit_2_with_one_line_naming_the_setting(monkeypatch, capsys, argv, env, said):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        parse_settings(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and said in err and err.count("\n") == 1, err


def test_settings_accept_upper_case_log_level_and_cuda_index(monkeypatch):
    monkeypatch.setenv("ATV_LOG_LEVEL", "DEBUG")
    settings = parse_settings(["--device", "cuda:1", "--dtype", "bf16"])
    assert (settings.log_level, settings.device, settings.dtype) == ("debug", "cuda:1", "bf16")


def test_torch_threads_follow_the_containers_cpu_quota(tmp_path, monkeypatch):
    from server.lifecycle import fit_threads_to_cpu_quota
    chosen = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu_max = tmp_path / "cpu.max"
    for text, threads in (("250000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None),
                          ("6400000 100000\n", None)):
        cpu_max.write_text(text)   # 2.5 cores -> 2 threads; half a core -> 1; no quota; more cores than threads
        assert fit_threads_to_cpu_quota(cpu_max) == threads
    assert fit_threads_to_cpu_quota(tmp_path / "missing") is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")   # the user's choice wins
    cpu_max.write_text("100000 100000\n")
    assert fit_threads_to_cpu_quota(cpu_max) is None
    assert chosen == [2, 1]


def test_cli_exits_1_when_the_model_cannot_load(tmp_path, caplog):
    code = cli(["--model", str(tmp_path / "missing"), "--generator", "none", "--device", "cpu",
                "--port", str(free_port())])
    assert code == 1
    # a user's mistake: one line naming the part and the fix, no traceback
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == [f"could not start: target '{tmp_path / 'missing'}': model folder "
                                               f"{tmp_path / 'missing'} does not exist; give a local folder, an HF "
                                               "model id or embedded:smollm2-135m-instruct (--log-level debug shows "
                                               "the traceback)"]
    assert errors[0].exc_info is None


def test_cli_passes_the_chat_template_to_the_engine(assets, tmp_path, caplog):
    missing = tmp_path / "missing.jinja"
    code = cli(["--model", str(assets.model), "--generator", "none", "--device", "cpu", "--port", str(free_port()),
                "--chat-template", str(missing)])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 1 and errors == [f"could not start: chat template '{missing}': no file {missing} (give a template "
                                    "file, or the template text itself) (--log-level debug shows the traceback)"]


def test_a_port_in_use_is_one_line_and_exit_1(assets, tmp_path):
    """uvicorn exits when it cannot bind: `atv serve` says so in one line (no traceback) and exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATV_")}
        env.update(ATV_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "atv_core.cli", "serve", "--model", str(assets.model), "--generator", "none",
               "--device", "cpu", "--port", str(taken.getsockname()[1])]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "could not listen on 127.0.0.1" in output, output
    assert "Traceback" not in output, output


def test_sigterm_drains_in_flight_requests_and_exits_0(assets, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATV_")}
    env.update(ATV_DRAIN_TIMEOUT="20", ATV_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "atv_core.cli", "serve", "--model", str(assets.model), "--generator",
           str(assets.generator), "--device", "cpu", "--port", str(port), "--max-tokens", "400"]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        eventually(lambda: _status(url + "/ready") == 200 or proc.poll() is not None, timeout=90, interval=0.2)
        assert proc.poll() is None, log_path.read_text()
        body = {"prompt": "Long story", "max_tokens": 400, "ignore_eos": True, "stream": True}  # ~1 s or more
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            eventually(lambda: _status(url + "/ready") == 503, timeout=5)
            refused = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=10)
            assert_error(refused, 503)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "drained" in log_path.read_text()


@pytest.mark.parametrize("drain_timeout, signals", [(0.3, 1), (60.0, 2)])
def test_drain_timeout_stops_what_still_runs(assets, drain_timeout, signals):
    """SIGTERM's handler, called directly (signals only reach the main thread): a request longer than the
    drain timeout, or any request once a second signal came, is stopped with an error event, and the server
    stops."""
    from server.lifecycle import DrainingServer

    engine = async_engine(assets.model, None)
    engine.engine.step_listeners.append(lambda stats: time.sleep(0.02))
    app = create_app(engine.start(), make_settings(), Metrics())
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = DrainingServer(config, app.state.atv, drain_timeout=drain_timeout)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: server.started)
        body = {"prompt": "x", "max_tokens": 64, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            server.handle_exit(signal.SIGTERM, None)
            assert _status(f"http://127.0.0.1:{port}/ready") == 503
            if signals == 2:
                server.handle_exit(signal.SIGTERM, None)
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["error"]["code"] == "shutting_down"
        thread.join(15)
        assert not thread.is_alive()
        assert server.should_exit and not server.force_exit
        server.handle_exit(signal.SIGINT, None)   # once stopping, another signal forces the exit
        assert server.force_exit
    finally:
        server.should_exit = True
        thread.join(5)
        engine.shutdown()
    assert not engine.engine.runner.rows


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None
