"""bf16 on CPU: the automatic dtype choice (processor capability monkeypatched), and bf16 variants of the
parity tests (test_paged_engine, test_injection, test_engine) on tiny models, with a bf16 tolerance.

The tolerance, and why: bf16 keeps 8 significant bits, so rounding a value moves it by up to 2^-8 of its
magnitude (one 'ulp' step is 2^-7 relative). The engine and the plain forward compute the same logits in
other summation orders (packed steps, chunked keys, other batch shapes); every layer's output is rounded
to bf16, so the two disagree by a few such steps. Measured on these models: up to 1.5 steps (0.047 at
|logit| 4.75). We allow 4 steps of the largest logit, 2^-6 * max|logit| (~0.08 here), and no relative term.
That is not below the bf16-vs-fp32 difference itself (0.03-0.12 here), so these tests do not check bf16
against fp32; they check the engine's machinery in bf16, where a wrong KV block, position, mask or vector
moves logits by O(1) (the steered-vs-unsteered check below measures that scale).

The exception is the chunked-prefill run, whose decodes go through the CPU decode kernel: it rounds attention
once where the plain forward's SDPA rounds per block, and over 8 decode steps the two drifted up to 5.4 steps
apart (0.086 at |logit| 4.06), though each was as far from fp32 as the other. That test compares both with an
fp32 forward of the same bf16 weights instead.
"""
import logging
import random

import pytest
import torch

from atv_core import models
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.engine.request import Request, SamplingParams, SteeringSpec
from atv_core.steering.checkpoint import load_generator
from atv_core.steering.injection import make_table, prompt_slots, steering
from tests.conftest import ARCHS
from tests.test_paged_engine import chunked_run_against_a_plain_forward
from tests.tiny import drain, make_model, make_tiny_generator_dir, make_tokenizer, record_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
CHUNKY = dict(max_running=4, max_num_batched_tokens=16, block_size=4, long_prompt_tokens=6, long_prefill_chunk=5)
CPU = torch.device("cpu")


def assert_close_bf16(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """Within 4 bf16 rounding steps of the largest value (see the module docstring)."""
    atol = 2 ** -6 * float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0, msg=msg)


def _bf16_model(arch: str = "llama"):
    return make_model(arch).to(torch.bfloat16)


def _ids(n, seed):
    return random.Random(seed).choices(range(10, 200), k=n)


# ---- the automatic choice -------------------------------------------------------------------------
def _cpu(monkeypatch, probes: dict, flags: set):
    monkeypatch.setattr(models, "_torch_bf16_probes", lambda: probes)
    monkeypatch.setattr(models, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(models, "_torch_cpu_capability", lambda: "AVX512")


@pytest.mark.parametrize("probes, flags, want", [
    ({"avx512_bf16": True, "amx_tile": False}, set(), torch.bfloat16),    # torch's probe says yes
    ({}, {"avx512f", "amx_bf16"}, torch.bfloat16),                       # a torch without probes: cpuinfo
    ({"avx512_bf16": False, "amx_tile": False}, {"avx512f", "avx512_vnni"}, torch.float32),   # this VM
])
def test_auto_picks_bf16_only_where_the_cpu_has_it_and_logs_why(monkeypatch, caplog, probes, flags, want):
    _cpu(monkeypatch, probes, flags)
    with caplog.at_level(logging.INFO, logger="atv.models"):
        assert models.select_dtype("auto", CPU) is want
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"dtype auto on CPU -> {str(want)[6:]}")
    assert ("no AVX512-BF16 or AMX-BF16" in message) == (want is torch.float32)


@pytest.mark.parametrize("capability, want", [((7, 0), torch.float16), ((7, 5), torch.float16),    # V100, T4
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])  # A100, H100
def test_auto_on_cuda_picks_bf16_only_where_the_gpu_computes_it(monkeypatch, capability, want):
    # torch.cuda.is_bf16_supported() is True on V100/T4 too (it counts emulation): the capability decides
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert models.select_dtype("auto", torch.device("cuda:1")) is want


def test_an_explicit_dtype_is_kept_whatever_the_cpu(monkeypatch):
    _cpu(monkeypatch, {"avx512_bf16": True}, {"avx512_bf16"})
    assert models.select_dtype("float32", CPU) is torch.float32
    _cpu(monkeypatch, {}, set())
    assert models.select_dtype("bfloat16", CPU) is torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        models.select_dtype("int8", CPU)


def test_the_real_probe_agrees_with_proc_cpuinfo():
    native, reason = models.cpu_bf16_support()
    flags = models._cpu_flags()
    if flags:   # where /proc/cpuinfo exists, its flags and torch's probe describe the same processor
        assert native == bool(flags & {"avx512_bf16", "amx_bf16"}), reason


# ---- parity in bf16 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_chunked_prefill_and_decode_are_as_close_to_fp32_as_a_plain_bf16_forward(arch):
    model = _bf16_model(arch)
    assert LLMEngine(model, make_tokenizer(), None, EngineConfig(**CHUNKY)).runner.dtype is torch.bfloat16
    fp32 = _bf16_model(arch).float()                       # the same bf16 weights, computed in fp32
    for request_id, got, want, ids in chunked_run_against_a_plain_forward(model, reference=fp32):
        with torch.no_grad():
            plain = model(torch.tensor([ids[:-1]])).logits[0, -len(got):].float()    # a plain bf16 forward
        engine_error, plain_error = (float((x.float() - want).abs().max()) for x in (got, plain))
        # the engine is no farther from fp32 than twice the plain bf16 forward (measured 0.8-1.4x), and a
        # wrong block, position or mask would be off by the logits' own scale
        assert engine_error <= 2 * plain_error + 2 ** -8 * float(want.abs().max()), f"{arch} {request_id}"
        assert engine_error < 2 ** -4 * float(want.abs().max()), f"{arch} {request_id}: {engine_error}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["all", "last"])
def test_bf16_batch_parity_with_different_vectors_and_lengths(arch, policy):
    model = _bf16_model(arch)
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(3, model.config.num_hidden_layers, model.config.hidden_size, generator=g)
    lengths = [5, 9, 3]
    prompts = [torch.randint(5, 200, (n,)) for n in lengths]
    ids, mask = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)], mask[b, : len(p)] = p, 1
    with torch.no_grad():
        with steering(model, make_table(vectors).to(torch.bfloat16), prompt_slots([1, 2, 3], lengths, policy)):
            batched = model(ids, attention_mask=mask).logits
        for b, p in enumerate(prompts):
            table = make_table(vectors[b: b + 1]).to(torch.bfloat16)
            with steering(model, table, prompt_slots([1], [len(p)], policy)):
                alone = model(p[None]).logits[0]
            with steering(model, None, None):
                bare = model(p[None]).logits[0]
            assert_close_bf16(batched[b, : len(p)], alone, f"{arch} {policy} row {b}")
            assert float((alone.float() - bare.float()).abs().max()) > 0.5   # what steering moves: O(1)


def test_bf16_steered_requests_joining_mid_flight_match_their_solo_runs(tmp_path):
    model = _bf16_model("llama")
    tok = make_tokenizer()
    generator = load_generator(make_tiny_generator_dir(tmp_path / "gen"), target=model)
    texts = ["the first request, fairly long prompt", "hi", "another one, steered"]

    def request(i):
        return Request(f"r{i}", tok(texts[i])["input_ids"], GREEDY, SteeringSpec("atv"), texts[i])
    solo = {}
    for i in range(3):
        engine = LLMEngine(model, tok, generator, EngineConfig(max_running=4))
        seen = record_logits(engine)
        engine.add_request(request(i))
        drain(engine)
        solo[f"r{i}"] = seen[f"r{i}"]
    engine = LLMEngine(model, tok, generator, EngineConfig(max_running=4))
    seen = record_logits(engine)
    engine.add_request(request(0))
    engine.step()
    engine.step()
    engine.add_request(request(1))
    engine.add_request(request(2))
    drain(engine)
    for rid, want in solo.items():
        for step, (got, ref) in enumerate(zip(seen[rid], want)):
            assert_close_bf16(got, ref, f"{rid} step {step}")


def test_a_generator_loaded_for_a_bf16_target_encodes_in_bf16_with_fp32_heads(tmp_path):
    """The backbone follows a bf16 target; the expansion and gate stay fp32 and read fp32 pooled states, so
    the vectors stay within bf16 rounding of the fp32 generator's (a relative error, not O(1))."""
    folder = make_tiny_generator_dir(tmp_path / "gen")
    fp32 = load_generator(folder, target=make_model("llama"))
    bf16 = load_generator(folder, target=_bf16_model("llama"))
    assert next(fp32.backbone.parameters()).dtype == torch.float32
    assert {p.dtype for p in bf16.backbone.parameters()} == {torch.bfloat16}
    assert bf16.expansion.weight.dtype == torch.float32
    prompts = ["a query", "Word: cold\nAntonym:", "an altogether longer prompt, with more words in it"]
    with torch.no_grad():
        want, got = fp32(prompts), bf16(prompts)
    assert got.vectors.dtype == got.pooled.dtype == torch.float32
    relative = (got.vectors - want.vectors).norm(dim=(1, 2)) / want.vectors.norm(dim=(1, 2))
    assert float(relative.max()) < 0.05
    assert not torch.equal(got.vectors, want.vectors)          # it did compute in bf16
    torch.testing.assert_close(got.gates, want.gates, atol=0.02, rtol=0)


def test_a_decoder_backbone_cast_for_a_bf16_target_keeps_its_rope_buffers_fp32(tmp_path):
    """Only parameters are cast: a RoPE's inv_freq stays fp32, as from_pretrained(dtype=bf16) keeps it (a bf16
    inv_freq puts the rotary angles of later positions off)."""
    folder = make_tiny_generator_dir(tmp_path / "gen", backbone_arch="llama")
    generator = load_generator(folder, target=_bf16_model("llama"))
    buffers = {name: b.dtype for name, b in generator.backbone.named_buffers() if b.is_floating_point()}
    assert any("inv_freq" in name for name in buffers) and set(buffers.values()) == {torch.float32}
    assert {p.dtype for p in generator.backbone.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert generator(["a decoder-backbone query"]).vectors.dtype == torch.float32
