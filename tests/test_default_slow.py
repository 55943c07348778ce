"""Slow tests on the real embedded default: SmolLM2-135M-Instruct + the shipped generator."""
import pytest
import torch

from atv_core.models import DEFAULT_GENERATOR_DIR as DEFAULT_GENERATOR
from atv_core.steering.checkpoint import load_generator
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.models import EMBEDDED_TARGET, load_target
from atv_core.engine.request import Request, SamplingParams, SteeringSpec
from tests.tiny import drain, record_logits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default():
    model, tok = load_target(EMBEDDED_TARGET, "cpu", "float32")
    return model, tok, load_generator(DEFAULT_GENERATOR, target=model)


def _req(tok, rid, prompt, mode="atv", n=10):
    return Request(rid, tok(prompt)["input_ids"], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                   SteeringSpec(mode), prompt)


def test_plain_chat_answer_is_sane(default):
    model, tok, gen = default
    engine = LLMEngine(model, tok, gen, EngineConfig(max_running=4))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    req = Request("c", tok(prompt, add_special_tokens=False)["input_ids"], SamplingParams(max_tokens=12, temperature=0),
                  SteeringSpec("off"))
    engine.add_request(req)
    drain(engine)
    assert "Paris" in req.output_text


def test_steering_answers_a_seen_task_the_plain_model_misses(default):
    model, tok, gen = default
    engine = LLMEngine(model, tok, gen, EngineConfig(max_running=4))
    prompt = "Review: A gorgeous, moving film with superb acting.\nSentiment:"
    steered, off = _req(tok, "s", prompt), _req(tok, "o", prompt, "off")
    engine.add_request(steered)
    engine.add_request(off)
    drain(engine)
    assert steered.output_text.strip().lower().startswith("positive")
    assert steered.output_ids != off.output_ids
    assert 0 < steered.steering_report.gate <= 1 and steered.steering_report.vector_norm > 0


def test_mid_flight_join_matches_solo_on_the_real_model(default):
    model, tok, gen = default
    prompts = ["Country: Japan\nCapital:", "Q: What is the opposite of \"hot\"?\nA:", "Write a haiku about rain."]
    modes = ["atv", "atv", "off"]
    solo = {}
    for i, (p, m) in enumerate(zip(prompts, modes)):
        engine = LLMEngine(model, tok, gen, EngineConfig(max_running=4))
        logits = record_logits(engine)
        r = _req(tok, f"r{i}", p, m)
        engine.add_request(r)
        drain(engine)
        solo[i] = (logits[r.request_id], r.output_ids)
    engine = LLMEngine(model, tok, gen, EngineConfig(max_running=4))
    seen = record_logits(engine)
    reqs = [_req(tok, f"r{i}", p, m) for i, (p, m) in enumerate(zip(prompts, modes))]
    engine.add_request(reqs[0])
    for _ in range(3):
        engine.step()
    engine.add_request(reqs[1])
    engine.add_request(reqs[2])
    drain(engine)
    for i, r in enumerate(reqs):
        ref_logits, ref_tokens = solo[i]
        for got, ref in zip(seen[r.request_id], ref_logits):
            # fp32 with another batch shape: last-bit differences through 30 layers stay below 1e-3 absolute
            torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-4)
        margins = [float(x.topk(2).values[0] - x.topk(2).values[1]) for x in ref_logits]
        agree = next((k for k, m in enumerate(margins) if m < 1e-2), len(margins))
        assert r.output_ids[:agree] == ref_tokens[:agree]


def test_a_long_prompt_chunked_beside_decodes_matches_a_plain_forward(default):
    model, tok, _ = default
    engine = LLMEngine(model, tok, None, EngineConfig(max_running=4, long_prompt_tokens=64, long_prefill_chunk=32))
    seen = record_logits(engine)
    text = " ".join(f"Country number {i} has a capital city and a flag." for i in range(60))
    short, long = _req(tok, "s", "Write a haiku about rain.", "off", n=40), _req(tok, "l", text, "off", n=4)
    assert long.num_prompt_tokens > 600
    engine.add_request(short)
    engine.step()
    engine.add_request(long)
    chunks = []
    while engine.has_work():
        batch_before = long.num_computed_tokens
        engine.step()
        chunks.append(long.num_computed_tokens - batch_before)
    assert 32 in chunks and engine.scheduler.blocks.num_used == 0   # it was chunked beside the short decodes
    for r in (short, long):
        ids = torch.tensor([r.prompt_ids + r.output_ids[:-1]])
        with torch.no_grad():
            reference = model(ids).logits[0, r.num_prompt_tokens - 1:]
        # fp32 through 30 layers, other summation order (chunks, packed steps): same bound as the join test
        torch.testing.assert_close(torch.stack(seen[r.request_id]), reference, atol=2e-3, rtol=1e-4)
