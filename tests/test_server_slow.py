"""The server on the real embedded default target (SmolLM2-135M-Instruct, converted once into ATV_CACHE_DIR).

The generator is the shipped atv_core/default_generator.
"""
from __future__ import annotations


import httpx
import pytest

from atv_core.engine.build import build_engine
from atv_core.engine.async_engine import AsyncEngine
from atv_core.engine.llm_engine import EngineConfig
from atv_core.models import EMBEDDED_TARGET
from tests.test_server import assert_error, make_settings, serving

pytestmark = pytest.mark.slow


def test_embedded_default_serves_a_steered_completion(tmp_path):
    config = EngineConfig(max_running=4, max_waiting=8)
    engine = AsyncEngine(build_engine(EMBEDDED_TARGET, "default", device="cpu", config=config))
    with serving(engine, make_settings(model=EMBEDDED_TARGET)) as served:
        body = {"model": EMBEDDED_TARGET, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        review = {**body, "prompt": "Review: A gorgeous, moving film with superb acting.\nSentiment:", "max_tokens": 3}
        sentiment = served.post("/v1/completions", {**review, "atv": {"mode": "atv"}}).json()
        assert sentiment["choices"][0]["text"].strip().lower().startswith("positive")  # the trained generator
        # bad_words on a real BPE tokenizer: "positive" blocks " positive" (the word mid-text) too; case-sensitive
        banned = served.post("/v1/completions", {**review, "atv": {"mode": "atv"}, "bad_words": ["positive"]}).json()
        assert "positive" not in banned["choices"][0]["text"], banned
        steered = served.post("/v1/completions", {**body, "atv": {"mode": "atv", "scale": 1.0}})
        assert steered.status_code == 200, steered.text
        result = steered.json()
        assert result["atv"]["mode"] == "atv" and result["atv"]["vector_norm"] > 0
        assert result["choices"][0]["text"] and result["usage"]["completion_tokens"] >= 1
        plain = served.post("/v1/completions", {**body, "atv": {"mode": "off"}}).json()
        assert "paris" in plain["choices"][0]["text"].lower()  # the real model, unsteered, knows this

        chat = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hello."}],
                                                     "max_tokens": 8, "temperature": 0})
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"]
        assert_error(served.post("/v1/completions", {**body, "prompt": "x " * 9000}), 413)
        assert httpx.get(served.url + "/ready").status_code == 200
