"""The server on the real embedded default target (SmolLM2-135M-Instruct, converted once into ATV_CACHE_DIR).

The generator is atv_core/default_generator when it exists; until it does, a random low-rank generator
shaped for this target (tiny BERT backbone) stands in, so the steering path is still exercised end to end
on the real model (a plumbing check, not a quality check).
"""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from atv_core.checkpoint import load_generator, save_generator
from atv_core.engine import AsyncEngine, EngineConfig, LLMEngine
from atv_core.generator import ATVGenerator, GeneratorConfig
from atv_core.layers import find_decoder_layers
from atv_core.models import EMBEDDED_TARGET, load_backbone, load_target
from server.lifecycle import DEFAULT_GENERATOR_DIR
from tests.test_server import assert_error, make_settings, serving
from tests.tiny import make_tiny_model_dir

pytestmark = pytest.mark.slow


def stand_in_generator(model, folder: Path) -> Path:
    """A random generator checkpoint fitting `model` (used only while no default generator is shipped)."""
    backbone_dir = make_tiny_model_dir(folder / "backbone", "bert")
    config = GeneratorConfig(backbone=str(backbone_dir), target=EMBEDDED_TARGET, rank=8,
                             target_layers=len(find_decoder_layers(model)), target_hidden=model.config.hidden_size)
    backbone, tokenizer = load_backbone(str(backbone_dir))
    generator = ATVGenerator(config, backbone, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in generator.expansion.parameters():  # the up-projection starts at zero: make vectors non-zero
            p.normal_(0, 0.05)
    return save_generator(generator, folder / "generator")


def test_embedded_default_serves_a_steered_completion(tmp_path):
    model, tokenizer = load_target(EMBEDDED_TARGET, device="cpu")
    shipped = (DEFAULT_GENERATOR_DIR / "atv_config.json").exists()
    generator = load_generator(DEFAULT_GENERATOR_DIR if shipped else stand_in_generator(model, tmp_path), target=model)
    engine = AsyncEngine(LLMEngine(model, tokenizer, generator, EngineConfig(max_running=4, max_waiting=8)))
    with serving(engine, make_settings(model=EMBEDDED_TARGET)) as served:
        body = {"model": EMBEDDED_TARGET, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
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
