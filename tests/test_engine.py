"""The engine on tiny random models: batch parity mid-flight, seeds, stops, aborts, faults, no leaks."""
import asyncio

import pytest
import torch

from atv_core.steering.checkpoint import load_generator
from atv_core.engine.async_engine import AsyncEngine
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.engine.request import InvalidRequest, Request, SamplingParams, SteeringReport, SteeringSpec, Status
from tests.tiny import drain as _drain, make_model, make_tiny_generator_dir, make_tokenizer, record_logits as _record

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    model = make_model("llama")
    generator = load_generator(make_tiny_generator_dir(tmp_path_factory.mktemp("g") / "gen"), target=model)
    return model, make_tokenizer(), generator


def _engine(parts, **kw):
    model, tok, gen = parts
    return LLMEngine(model, tok, gen, EngineConfig(**{"max_running": 8, **kw}))


def _request(tok, rid, text, params=GREEDY, mode="atv"):
    return Request(rid, tok(text)["input_ids"], params, SteeringSpec(mode), text)


SPECS = [  # (id, prompt, params, mode): other lengths, vectors and sampling settings
    ("a", "the first request, fairly long prompt", GREEDY, "atv"),
    ("b", "hi", SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=7, ignore_eos=True), "atv"),
    ("c", "a middle length prompt", GREEDY, "off"),
    ("d", "another one, steered", SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True), "atv"),
]


def test_joining_mid_flight_matches_solo_runs(parts):
    tok = parts[1]
    solo = {}
    for rid, text, params, mode in SPECS:
        engine = _engine(parts)
        logits = _record(engine)
        req = _request(tok, rid, text, params, mode)
        engine.add_request(req)
        _drain(engine)
        solo[rid] = (logits[rid], req.output_ids)
    engine = _engine(parts)
    logits = _record(engine)
    reqs = {rid: _request(tok, rid, text, params, mode) for rid, text, params, mode in SPECS}
    engine.add_request(reqs["a"])
    engine.step()
    engine.step()
    engine.add_request(reqs["b"])          # joins a running batch
    engine.step()
    engine.add_request(reqs["c"])
    engine.add_request(reqs["d"])
    _drain(engine)
    for rid, req in reqs.items():
        ref_logits, ref_tokens = solo[rid]
        assert len(logits[rid]) == len(ref_logits)
        for step, (got, ref) in enumerate(zip(logits[rid], ref_logits)):
            # fp32 results differ in the last bits with batch shape (other GEMM blocking, padded attention);
            # 1e-4 absolute on logits of magnitude ~10 is ~1e-5 relative: far below any decision margin here
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5, msg=f"{rid} step {step}")
            top2 = ref.topk(2).values
            assert float(top2[0] - top2[1]) > 1e-3 or req.params.temperature > 0
        assert req.output_ids == ref_tokens, rid  # greedy and seeded sampling: same tokens
    assert engine.runner.rows == [] and engine.runner.slots_used == 0


def test_steering_changes_outputs_and_off_equals_plain_model(parts):
    model, tok, _ = parts
    engine = _engine(parts)
    steered, off = _request(tok, "s", "hello there"), _request(tok, "o", "hello there", mode="off")
    engine.add_request(steered)
    engine.add_request(off)
    _drain(engine)
    ids = torch.tensor([off.prompt_ids])
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert off.output_ids == plain
    assert steered.output_ids != plain
    assert steered.steering_report.vector_norm > 0 and off.steering_report == SteeringReport("off", 1.0)


def test_seeded_sampling_is_reproducible_across_batch_compositions(parts):
    tok = parts[1]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    runs = []
    for neighbours in (0, 3):
        engine = _engine(parts)
        target = _request(tok, "t", "sample me", params)
        for i in range(neighbours):
            engine.add_request(_request(tok, f"n{i}", "x" * (3 + 5 * i), SamplingParams(
                max_tokens=10, temperature=1.0, seed=i, ignore_eos=True)))
        engine.add_request(target)
        _drain(engine)
        runs.append(target.output_ids)
    assert runs[0] == runs[1]


def test_max_tokens_stop_strings_and_stop_tokens(parts):
    tok = parts[1]
    engine = _engine(parts)
    free = _request(tok, "f", "stop test", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    engine.add_request(free)
    _drain(engine)
    assert free.finish_reason == "length" and len(free.output_ids) == 12 and free.stop_reason is None
    text = free.output_text
    stop = text[4:6]
    engine.add_request(r := _request(tok, "s", "stop test", SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,),
                                                                          ignore_eos=True)))
    _drain(engine)
    assert r.finish_reason == "stop" and r.output_text == text[: text.find(stop)] and r.stop_reason == stop
    engine.add_request(t := _request(tok, "t", "stop test", SamplingParams(
        max_tokens=12, temperature=0.0, stop_token_ids=(free.output_ids[3],), ignore_eos=True)))
    _drain(engine)
    first = free.output_ids.index(free.output_ids[3])
    assert t.finish_reason == "stop" and t.output_ids == free.output_ids[: first + 1]
    assert t.stop_reason == free.output_ids[3]   # vLLM's stop_reason: the token id
    assert t.output_text == tok.decode(t.output_ids[:-1])   # the stop token is not in the text (vLLM's default)
    engine.eos_ids = {free.output_ids[2]}
    engine.add_request(e := _request(tok, "e", "stop test", SamplingParams(max_tokens=12, temperature=0.0)))
    _drain(engine)
    assert e.finish_reason == "stop" and e.output_text == tok.decode(e.output_ids[:-1])
    assert e.stop_reason is None                 # EOS: none (as vLLM)


def test_streamed_deltas_never_split_a_utf8_character(parts):
    tok = parts[1]
    engine = _engine(parts)
    deltas = []
    req = Request("u", [5], SamplingParams(max_tokens=100), SteeringSpec("off"),
                  on_output=lambda out: deltas.append(out.text_delta))
    req.status = Status.RUNNING
    for token in tok("héllo 日本 ✓")["input_ids"]:
        engine._append(req, token, None)
    engine.abort("u") or engine._retire(req, [], None)
    assert "".join(deltas) == "héllo 日本 ✓"
    assert all("\ufffd" not in d for d in deltas)


def test_abort_frees_slot_and_row_within_one_step(parts):
    tok = parts[1]
    engine = _engine(parts)
    a, b = _request(tok, "a", "abort me"), _request(tok, "b", "keep me")
    engine.add_request(a)
    engine.add_request(b)
    engine.step()
    engine.step()
    out = engine.abort("a")
    assert out.finished and out.finish_reason == "abort"
    assert engine.runner.rows == [b] and engine.runner.slots_used == 1
    assert not a.block_table and engine.scheduler.blocks.num_used == len(b.block_table) > 0
    _drain(engine)
    assert b.finish_reason == "length" and engine.abort("nope") is None
    assert engine.scheduler.blocks.num_used == 0


def test_no_growth_after_1000_short_requests(parts):
    tok = parts[1]
    engine = _engine(parts, max_waiting=2000)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    reqs = [_request(tok, f"r{i}", f"q{i % 7}", params, "atv" if i % 2 else "off") for i in range(1000)]
    for r in reqs:
        engine.add_request(r)
    _drain(engine)
    assert all(r.finish_reason == "length" for r in reqs)
    assert engine.runner.rows == [] and engine.runner.slots_used == 0 and len(engine.runner.free_slots) == 8
    assert engine.scheduler.blocks.num_used == 0 and not engine._generators
    assert engine.runner.cache.high_water <= 16   # 8 running requests of 4 tokens never needed more blocks
    assert torch.count_nonzero(engine.runner.table) == 0


def test_non_finite_vector_fails_only_its_request(parts):
    tok = parts[1]
    engine = _engine(parts)
    real = engine.generator.forward

    def poisoned(prompts, use_gate=True):
        out = real(prompts, use_gate)
        for i, p in enumerate(prompts):
            if "poison" in p:
                out.vectors[i, 0, 0] = float("nan")
        return out
    engine.generator.forward = poisoned
    good, bad = _request(tok, "g", "fine"), _request(tok, "p", "poison")
    engine.add_request(good)
    engine.add_request(bad)
    _drain(engine)
    assert bad.finish_reason == "error" and "non-finite" in bad.error
    assert good.finish_reason == "length" and len(good.output_ids) == 12
    assert engine.runner.slots_used == 0


def test_validation_errors_say_how_to_fix(parts):
    model, tok, _ = parts
    engine = _engine(parts, max_model_len=32)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(Request("e", [], GREEDY))
    with pytest.raises(ValueError, match="shorten the prompt or lower max_tokens"):
        engine.add_request(Request("l", [5] * 30, GREEDY))
    plain = LLMEngine(model, tok, None, EngineConfig(max_running=2))
    with pytest.raises(ValueError, match="use mode 'off'"):
        plain.add_request(_request(tok, "x", "hi"))


def test_engine_settings_that_cannot_work_are_refused_with_the_fix(parts):
    model, tok, gen = parts
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"max_model_len {limit + 1} exceeds the target's context of {limit}"):
        LLMEngine(model, tok, gen, EngineConfig(max_model_len=limit + 1))
    assert LLMEngine(model, tok, gen, EngineConfig(max_model_len=limit)).max_model_len == limit
    with pytest.raises(ValueError, match=r"holds no block of 16 tokens .*--kv-cache-gib"):
        LLMEngine(model, tok, gen, EngineConfig(kv_cache_bytes=1000))


def test_async_engine_streams_and_aborts_on_disconnect(parts):
    tok = parts[1]
    engine = AsyncEngine(_engine(parts)).start()

    async def main():
        chunks = []
        async for out in engine.generate(tok("hello")["input_ids"], GREEDY, SteeringSpec("atv"), "hello"):
            chunks.append(out)
        gen = engine.generate(tok("bye")["input_ids"], SamplingParams(max_tokens=200, temperature=0.0,
                                                                      ignore_eos=True), SteeringSpec("atv"), "bye")
        await gen.__anext__()
        await gen.aclose()          # the consumer goes away
        for _ in range(100):
            if not engine.engine.runner.rows:
                break
            await asyncio.sleep(0.02)
        return chunks
    try:
        chunks = asyncio.run(main())
        assert chunks[-1].finished and chunks[-1].completion_tokens == 12
        assert engine.engine.runner.rows == [] and engine.engine.runner.slots_used == 0
    finally:
        engine.shutdown()


def test_engine_death_is_reported_and_fails_requests(parts):
    tok = parts[1]
    engine = AsyncEngine(_engine(parts))

    def boom(*_a, **_k):
        raise RuntimeError("device lost")
    engine.engine.runner.run = boom
    engine.start()

    async def main():
        return [out async for out in engine.generate(tok("x")["input_ids"], GREEDY, SteeringSpec("off"))]
    try:
        outs = asyncio.run(main())
        assert outs[-1].finish_reason == "error" and "device lost" in outs[-1].error
        engine._thread.join(2)
        assert not engine.is_alive and "device lost" in engine.error
    finally:
        engine.shutdown()


def test_sampler_survives_degenerate_parameters_and_non_finite_logits():
    from atv_core.engine.sampler import make_generator, sample
    logits = torch.randn(3, 50)
    logits[2] = float("nan")
    params = [SamplingParams(temperature=1e-300), SamplingParams(temperature=1.0, top_p=1e-300),
              SamplingParams(temperature=1.0)]
    tokens = sample(logits, params, [make_generator(i) for i in range(3)])
    assert tokens[0] == logits[0].argmax() and tokens[1] == logits[1].argmax() and 0 <= tokens[2] < 50


def test_sampling_follows_the_distribution_and_its_top_k_top_p_filters():
    from atv_core.engine.sampler import make_generator, sample
    n, logits = 6000, torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -200.0])   # the last underflows to 0
    probs = torch.softmax(logits, -1)
    for params, allowed in ((SamplingParams(temperature=1.0), 7),
                            (SamplingParams(temperature=1.0, top_k=3), 3),
                            (SamplingParams(temperature=1.0, top_p=0.5), 2)):   # mass before token 2: 0.53
        tokens = sample(logits.expand(n, -1).clone(), [params] * n, [make_generator(i) for i in range(n)])
        freq = torch.bincount(tokens, minlength=8).float() / n
        want = torch.zeros(8)
        want[:allowed] = probs[:allowed] / probs[:allowed].sum()
        assert freq[allowed:].sum() == 0, (params, freq)          # nothing filtered, nothing of zero mass
        assert (freq - want).abs().max() < 0.03, (params, freq, want)


def _reference_draw(row: torch.Tensor, params: SamplingParams, u: float) -> int:
    """One row the plain way: top-k / top-p over a full stable sort (ties by id), else the vocabulary's order;
    then the first token whose cumulative mass exceeds u * total."""
    x = row / params.temperature
    if params.min_p > 0:
        probs = torch.softmax(x, -1)
        x = x.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k > 0 or params.top_p < 1:
        values, ids = torch.sort(x, descending=True, stable=True)
        if params.top_k > 0:
            values[params.top_k:] = float("-inf")
        probs = torch.softmax(values, -1)
        probs[(probs.cumsum(-1) - probs) >= params.top_p] = 0
    else:
        ids, probs = torch.arange(len(x)), torch.softmax(x, -1)
    cdf = probs.cumsum(-1).tolist()
    index = next((i for i, c in enumerate(cdf) if c > u * cdf[-1]), len(cdf) - 1)
    while probs[index] == 0:
        index -= 1
    return int(ids[index])


@pytest.mark.parametrize("ties", [False, True])
def test_sampling_equals_a_full_sort_and_ignores_the_neighbours_settings(monkeypatch, ties):
    from atv_core.engine import sampler
    logits = torch.randn(12, 3000) * 2
    if ties:   # bf16 logits (the CUDA default) tie often; topk orders ties differently for different widths
        logits = logits.to(torch.bfloat16).float()
    settings = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
                SamplingParams(temperature=1.0, top_k=40, top_p=0.8), SamplingParams(temperature=0.7, top_p=0.9),
                SamplingParams(temperature=1.5, top_p=0.99), SamplingParams(temperature=1.0, top_k=300),
                SamplingParams(temperature=1.0, min_p=0.02), SamplingParams(temperature=0.9, top_p=0.95, min_p=0.1)]
    params = [settings[i % len(settings)] for i in range(12)]
    want = [_reference_draw(logits[i], params[i], float(torch.rand(1, generator=sampler.make_generator(i))))
            for i in range(12)]
    for candidates in (8, 1024):   # few (most rows then sorted in full), the default
        monkeypatch.setattr(sampler, "CANDIDATES", candidates)
        mixed = sampler.sample(logits, params, [sampler.make_generator(i) for i in range(12)]).tolist()
        alone = [int(sampler.sample(logits[i:i + 1], params[i:i + 1], [sampler.make_generator(i)])) for i in range(12)]
        assert mixed == alone == want, (candidates, mixed, alone, want)


def test_greedy_picks_the_first_of_tied_maxima_like_argmax():
    from atv_core.engine.sampler import sample
    logits = torch.zeros(3, 50)
    logits[0, [7, 3, 40]] = 2.0                      # tie: the lowest index wins
    logits[1, 9] = float("nan")                      # NaN counts as the maximum, as in argmax
    logits[2] = torch.randn(50)
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 3, [None] * 3)
    assert tokens.tolist() == [3, 9, int(logits[2].argmax())] == logits.argmax(-1).tolist()


def test_stop_string_after_a_multibyte_character_completes(parts):
    tok = parts[1]
    engine = _engine(parts)
    req = Request("m", [5], SamplingParams(max_tokens=100, stop=("é",)), SteeringSpec("off"))
    req.status = Status.RUNNING
    for token in tok("aé!")["input_ids"]:
        if req.finished:
            break
        engine._append(req, token, None)
    assert req.finish_reason == "stop" and req.output_text == "a"


def test_empty_prompt_text_is_refused_for_atv_and_a_bad_prompt_fails_alone(parts):
    tok = parts[1]
    engine = _engine(parts)
    with pytest.raises(ValueError, match="prompt text"):
        engine.add_request(Request("x", [5, 6], GREEDY, SteeringSpec("atv"), "  "))
    engine.validate(Request("z", [5, 6], GREEDY, SteeringSpec("atv", scale=0.0), "  "))   # scale 0: nothing to read
    real = engine.generator.forward

    def fragile(prompts, use_gate=True):
        if any("bad" in p for p in prompts):
            raise RuntimeError("cannot encode")
        return real(prompts, use_gate)
    engine.generator.forward = fragile
    good, bad = _request(tok, "g", "good"), _request(tok, "b", "bad one")
    engine.add_request(good)
    engine.add_request(bad)
    _drain(engine)
    assert bad.finish_reason == "error" and "cannot encode" in bad.error
    assert good.finish_reason == "length" and good.steering_report.vector_norm > 0


def _generator_reading_examples(parts, max_examples=2):
    import copy
    from dataclasses import replace

    generator = copy.copy(parts[2])
    generator.config = replace(parts[2].config, max_examples=max_examples)
    return generator


def test_examples_shape_the_vector_through_the_stored_input_format(parts):
    """atv.examples: the generator reads format_input(query, examples); the target reads the query alone."""
    from atv_core.engine.request import Example

    model, tok, _ = parts
    generator = _generator_reading_examples(parts)
    examples = (Example("hot", "cold"), Example("up", "down"))
    text = "big ->"
    with torch.no_grad():
        expected = generator([generator.format_input(text, examples)]).vectors[0].float()
    shown = Request("ex", tok(text)["input_ids"], GREEDY, SteeringSpec("atv", examples=examples), text)
    direct = Request("direct", tok(text)["input_ids"], GREEDY, SteeringSpec("atv"), text, vector=expected.clone())
    query_only = _request(tok, "query", text)
    logits = {}
    for request in (shown, direct, query_only):
        engine = LLMEngine(model, tok, generator, EngineConfig(max_running=2))
        seen = _record(engine)
        engine.add_request(request)
        _drain(engine)
        logits.update(seen)
    assert shown.num_prompt_tokens == direct.num_prompt_tokens  # no demonstration reached the target
    assert all(torch.equal(a, b) for a, b in zip(logits["ex"], logits["direct"]))
    assert not torch.equal(logits["ex"][0], logits["query"][0])


def test_examples_are_refused_with_the_fix_when_the_generator_cannot_read_them(parts):
    from atv_core.engine.request import Example

    model, tok, gen = parts
    request = Request("x", tok("a")["input_ids"], GREEDY, SteeringSpec("atv", examples=(Example("a", "b"),)), "a")
    with pytest.raises(ValueError, match="not trained to read atv.examples"):
        LLMEngine(model, tok, gen, EngineConfig(max_running=2)).validate(request)
    too_many = Request("y", tok("a")["input_ids"], GREEDY, SteeringSpec("atv", examples=(Example("a", "b"),) * 3), "a")
    with pytest.raises(ValueError, match="reads at most 2"):
        LLMEngine(model, tok, _generator_reading_examples(parts), EngineConfig(max_running=2)).validate(too_many)


# ---- logit bias, penalties, min_p ---------------------------------------------------------------
def test_logit_processing_is_the_documented_expression():
    from atv_core.engine.logits_processors import LogitsProcessors
    process = LogitsProcessors(eos_ids={2}).process
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, 1.0, 3.0]])
    plain = Request("p", [0, 1], SamplingParams(), SteeringSpec("off"))
    request = Request("r", [0, 1, 1, 6], SamplingParams(
        repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, logit_bias={4: 10.0, 5: -1.5, 6: -1.0},
        min_tokens=4), SteeringSpec("off"))
    request.output_ids = [3, 3, 5]
    out = process(logits.repeat(2, 1), [plain, request])
    # min_tokens: EOS (2) masked while 3 < 4 tokens; bias: 4 +10, 5 -1.5, 6 -1 (before the penalty: 3 - 1 = 2,
    # then / 2 = 1; the other order would give 0.5); repetition over prompt + output {0, 1, 3, 5, 6}: positive / 2,
    # negative * 2; frequency and presence over the output: 3 twice (-1 - 0.25), 5 once (-0.5 - 0.25)
    want = torch.tensor([1.0, -2.0, float("-inf"), 1.5 - 1.25, 10.0, (1.0 - 1.5) * 2 - 0.75, 1.0])
    assert torch.equal(out[1], want)
    assert torch.equal(out[0], logits[0])                         # a row that asks for nothing is untouched
    assert process(logits, [plain]) is logits                     # and no copy when no row asks
    request.output_ids = [3, 3, 5, 1]                             # min_tokens reached: EOS unmasked
    assert torch.isfinite(process(logits, [request])).all()
    # logit_bias: a repeated id keeps its last bias (as a JSON object), biases of 0 are dropped
    assert SamplingParams(logit_bias=((4, 10.0), (5, 0.0), (4, -3.0))).logit_bias == ((4, -3.0),)
    assert not SamplingParams(logit_bias={5: 0}).processes_logits
    with pytest.raises(ValueError, match="logit_bias must be"):
        SamplingParams(logit_bias=(4, 10.0))
    # allowed_token_ids: every other token -inf, first (a bias on a blocked token leaves it blocked)
    allowed = Request("a", [0], SamplingParams(allowed_token_ids=[1, 3], logit_bias={0: 5.0, 3: 1.0}),
                      SteeringSpec("off"))
    inf = float("-inf")
    assert torch.equal(process(logits, [allowed])[0], torch.tensor([inf, -1.0, inf, 4.0, inf, inf, inf]))
    assert allowed.params.allowed_token_ids == (1, 3) and allowed.params.processes_logits
    with pytest.raises(InvalidRequest, match="non-empty") as info:
        SamplingParams(allowed_token_ids=[])
    assert info.value.field == "allowed_token_ids"
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, 1.0, 3.0]]))   # the input is never changed


def test_bad_words_block_the_last_token_of_a_word_whose_other_tokens_end_the_output():
    """vLLM's bad words: a one-token word is always -inf; a longer word's last token is -inf when the output (not
    the prompt) ends with the word's other tokens; nothing else changes (exact)."""
    from atv_core.engine.logits_processors import LogitsProcessors, completing
    process = LogitsProcessors().process
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, 1.0, 3.0]])
    inf = float("-inf")
    request = Request("w", [4, 5], SamplingParams(bad_words_ids=[[1], (4, 5, 6), (5, 3)], logit_bias={1: 5.0}),
                      SteeringSpec("off"))
    assert request.params.processes_logits and request.params.bad_words_ids == ((1,), (4, 5, 6), (5, 3))
    # no output yet: only the one-token word (the prompt's 4, 5 does not count), and a bias cannot lift it
    assert torch.equal(process(logits, [request])[0], torch.tensor([2.0, inf, 0.5, 3.0, 0.0, 1.0, 3.0]))
    request.output_ids = [0, 4, 5]                                     # ends with 4 5 (-> 6) and with 5 (-> 3)
    assert torch.equal(process(logits, [request])[0], torch.tensor([2.0, inf, 0.5, inf, 0.0, 1.0, inf]))
    request.output_ids = [5, 4]                                        # ends with neither prefix
    assert torch.equal(process(logits, [request])[0], torch.tensor([2.0, inf, 0.5, 3.0, 0.0, 1.0, 3.0]))
    assert completing([(7, 8, 9)], [8]) == [] and completing([(7, 8, 9)], [7, 8]) == [9]
    for bad in ([()], [(1, -2)], [5]):
        with pytest.raises(InvalidRequest) as info:
            SamplingParams(bad_words_ids=bad)
        assert info.value.field == "bad_words"


def test_truncated_prompts_keep_the_tokens_the_tokenizer_adds_as_transformers_left_truncation():
    """truncate_prompt_tokens on a tokenizer that adds BOS: BOS + the last k - 1 tokens, exactly transformers'
    left truncation (vLLM's), and whether anything was cut."""
    from tokenizers import processors
    from atv_core.engine.tokenization import TokenizerWorker
    tok = make_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>",
                                                                  tok.bos_token_id)])
    worker = TokenizerWorker(tok, 512)
    text = "the start is cut away"
    full = tok(text).input_ids
    assert full[0] == tok.bos_token_id and len(full) == len(text) + 1
    tok.truncation_side = "left"
    for keep in (1, 2, 5, len(full) - 1):
        ids, cut = asyncio.run(worker.encode_last(text, keep))
        assert cut and ids == tok(text, truncation=True, max_length=keep).input_ids, keep
    assert asyncio.run(worker.encode_last(text, 5))[0] == [tok.bos_token_id] + full[-4:]
    assert asyncio.run(worker.encode_last(text, len(full))) == (full, False)
    worker.shutdown()


def test_bad_words_are_tokenized_as_written_and_after_a_space_by_vllms_rule():
    from atv_core.engine.tokenization import bad_word_sequences
    encode = {"cat": [5], " cat": [9], "hot dog": [1, 2], " hot dog": [3, 2], "a b": [4, 0, 6], " a b": [0, 4, 0, 6],
              "x": [7], " x": [7]}.__getitem__
    # " cat" is another token: both; " a b" has more tokens and " x" the same first token: as written only
    assert bad_word_sequences(encode, ["cat", "  hot dog", "a b", "x"]) == [(5,), (9,), (1, 2), (3, 2), (4, 0, 6), (7,)]


def test_greedy_bad_words_match_transformers_generate(parts):
    """A one-token bad word (the plain model's first token) and a two-token word taken from the output that
    results: the engine's greedy tokens equal transformers `generate` with the same bad_words_ids, and the word
    is gone from the output."""
    model, tok, _ = parts
    prompt = tok("a b c d e f")["input_ids"]

    def run(words):
        engine = _engine(parts)
        request = Request("w", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                      bad_words_ids=words), SteeringSpec("off"))
        engine.add_request(request)
        _drain(engine)
        ids = torch.tensor([prompt])
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0,
                            **({"bad_words_ids": [list(w) for w in words]} if words else {}))
        assert request.output_ids == hf[0, len(prompt):].tolist(), words
        return request.output_ids

    plain = run(())
    first = run(((plain[0],),))
    assert plain[0] not in first
    pair = (first[2], first[3])
    assert prompt[-1] != pair[0]   # (transformers also matches a word's start in the prompt; vLLM does not)
    both = run(((plain[0],), pair))
    assert both[:3] == first[:3] and both[3] != first[3]
    assert all(tuple(both[i:i + 2]) != pair for i in range(len(both) - 1)) and plain[0] not in both


def test_a_request_left_with_no_token_to_sample_ends_with_an_error_and_its_neighbour_goes_on(parts):
    """allowed_token_ids {5, 7} with bad words "5 7" and "5 5": after the output's first 5 both are banned, so
    nothing may be sampled. The request ends with an error on bad_words after that one token (before, the sampler
    took the argmax of an all -inf row: token 0, which the request forbade); a plain request in the same batch
    gets exactly the tokens it gets alone."""
    _, tok, _ = parts
    prompt = tok("a b c d e f")["input_ids"]
    plain = lambda: Request("p", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),  # noqa: E731
                            SteeringSpec("off"))
    engine = _engine(parts)
    alone = plain()
    engine.add_request(alone)
    _drain(engine)
    engine = _engine(parts)
    stuck = Request("s", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                allowed_token_ids=[5, 7], logit_bias={5: 100.0},
                                                bad_words_ids=[(5, 7), (5, 5)]), SteeringSpec("off"))
    engine.validate(stuck)                       # nothing is banned before any output: validation lets it through
    neighbour = plain()
    engine.add_request(stuck)
    engine.add_request(neighbour)
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    assert stuck.output_ids == [5] and stuck.finish_reason == "error" and stuck.error_field == "bad_words"
    assert "no token to sample after 1 output token:" in stuck.error
    assert [o.finish_reason for o in outputs if o.request_id == "s" and o.finished] == ["error"]
    assert neighbour.output_ids == alone.output_ids and neighbour.finish_reason == "length"
    assert engine.processors.cached == 0


@pytest.mark.parametrize("options, hf", [
    ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
    ({"logit_bias": {7: 3.0, 11: -2.0, 40: 1.5}}, {"sequence_bias": {(7,): 3.0, (11,): -2.0, (40,): 1.5}}),
    ({"allowed_token_ids": (7, 11, 40, 52)}, {"prefix_allowed_tokens_fn": lambda _batch, _ids: [7, 11, 40, 52]}),
])
def test_greedy_bias_and_repetition_penalty_match_transformers_generate(parts, options, hf):
    model, tok, _ = parts
    engine = _engine(parts)
    requests = [Request(f"r{i}", tok(text)["input_ids"], SamplingParams(max_tokens=12, temperature=0.0,
                                                                        ignore_eos=True, **options), SteeringSpec("off"))
                for i, text in enumerate(["the same words the same words", "hi", "a b c d e f"])]
    requests.append(_request(tok, "plain", "the same words the same words", mode="off"))   # a neighbour without
    for request in requests:
        engine.add_request(request)
    for _ in range(10):                                       # to the first sampled tokens
        engine.step()
        if engine.processors.cached:
            break
    assert engine.processors.cached == 3                      # the bias or prompt ids of the 3 that ask
    _drain(engine)
    assert engine.processors.cached == 0                      # what the processors kept is dropped at retire
    for request in requests[:-1]:
        ids = torch.tensor([request.prompt_ids])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0, **hf)[0, ids.shape[1]:].tolist()
        assert request.output_ids == want, (options, request.request_id)
    ids = torch.tensor([requests[-1].prompt_ids])
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert requests[-1].output_ids == plain              # the neighbour without the option: the plain model's
    assert requests[0].output_ids != plain               # the same prompt with it: changed


def test_frequency_and_presence_penalties_steer_greedy_tokens_and_logprobs_stay_raw(parts):
    """Each greedy token is the argmax of the raw logits minus the penalties of the output so far; the logprobs
    reported are the model's own (vLLM's default), not the processed ones."""
    tok = parts[1]
    engine = _engine(parts)
    logits = _record(engine)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, frequency_penalty=1.5,
                            presence_penalty=0.5, logprobs=1)
    request = _request(tok, "f", "again and again and again", params, mode="off")
    engine.add_request(request)
    outputs = []
    request.on_output = outputs.append
    _drain(engine)
    counts = torch.zeros(logits["f"][0].shape[-1])
    for step, raw in enumerate(logits["f"]):
        want = int((raw - 1.5 * counts - 0.5 * (counts > 0)).argmax())
        assert request.output_ids[step] == want, step
        counts[want] += 1
    assert len(set(request.output_ids)) > 1
    unpenalised = [int(raw.argmax()) for raw in logits["f"]]
    assert unpenalised != request.output_ids                       # the penalties decided some step
    reported = [lp for out in outputs for lp in out.logprobs]
    for raw, lp in zip(logits["f"], reported):
        assert lp.logprob == pytest.approx(float(torch.log_softmax(raw, -1)[lp.token_id]), abs=1e-5)


def test_a_large_logit_bias_forces_its_token_and_min_p_keeps_the_likely_ones():
    from atv_core.engine.logits_processors import LogitsProcessors
    process = LogitsProcessors().process
    from atv_core.engine.sampler import make_generator, sample
    n, logits = 6000, torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -200.0])
    probs = torch.softmax(logits, -1)
    params = SamplingParams(temperature=1.0, min_p=0.3)           # keeps p >= 0.3 * p_max: tokens 0, 1 and 2
    tokens = sample(logits.expand(n, -1).clone(), [params] * n, [make_generator(i) for i in range(n)])
    freq = torch.bincount(tokens, minlength=8).float() / n
    want = torch.zeros(8)
    want[:3] = probs[:3] / probs[:3].sum()
    assert freq[3:].sum() == 0 and (freq - want).abs().max() < 0.03, freq
    hot = [SamplingParams(temperature=2.0, min_p=0.3)] * n        # after the temperature: 0.5 is kept at T=2
    assert int(sample(logits.expand(n, -1).clone(), hot, [make_generator(i) for i in range(n)]).max()) == 4
    masked = logits.clone()
    masked[[0, 1]] = float("-inf")                                 # masked tokens (min_tokens): sampled around
    tokens = sample(masked.expand(n, -1).clone(), [SamplingParams(temperature=1.0)] * n,
                    [make_generator(i) for i in range(n)])
    freq = torch.bincount(tokens, minlength=8).float() / n
    want = torch.zeros(8)
    want[2:7] = probs[2:7] / probs[2:7].sum()
    assert freq[:2].sum() == 0 and (freq - want).abs().max() < 0.03, freq
    forced = SamplingParams(temperature=1.0, logit_bias={6: 100.0})
    request = Request("b", [1], forced, SteeringSpec("off"))
    row = process(logits.view(1, -1), [request])
    assert int(sample(row, [forced], [make_generator(0)])) == 6


def test_min_tokens_masks_stop_tokens_and_include_stop_keeps_the_stop_token_text(parts):
    tok = parts[1]
    engine = _engine(parts)
    plain = _request(tok, "p", "stop here please", mode="off")
    engine.add_request(plain)
    _drain(engine)
    stop = plain.output_ids[0]                                     # what greedy picks first
    params = dict(max_tokens=12, temperature=0.0, stop_token_ids=(stop,))
    early = _request(tok, "e", "stop here please", SamplingParams(**params), mode="off")
    kept = _request(tok, "k", "stop here please", SamplingParams(**params, include_stop_str_in_output=True), mode="off")
    late = _request(tok, "l", "stop here please", SamplingParams(**params, min_tokens=4), mode="off")
    for request in (early, kept, late):
        engine.add_request(request)
    _drain(engine)
    assert early.output_ids == kept.output_ids == [stop] and early.finish_reason == kept.finish_reason == "stop"
    assert early.output.text == "" and kept.output.text == tok.decode([stop]) != ""
    assert len(late.output_ids) >= 4 and stop not in late.output_ids[:4]
    sampled = [_request(tok, f"s{seed}", "stop here please", SamplingParams(
        max_tokens=2, temperature=1.0, seed=seed, min_tokens=2, stop_token_ids=(stop,)), mode="off") for seed in range(8)]
    for request in sampled:
        engine.add_request(request)
    _drain(engine)
    assert len({r.output_ids[0] for r in sampled}) > 1            # masked, and still sampled, not greedy
    assert all(stop not in r.output_ids for r in sampled)
    # refusals name the request field at fault (the HTTP error's param)
    with pytest.raises(InvalidRequest, match="stop_token_ids: token id 100000 is outside the vocabulary") as info:
        engine.validate(_request(tok, "v", "x", SamplingParams(stop_token_ids=(100000,), min_tokens=1), mode="off"))
    assert info.value.field == "stop_token_ids"
    with pytest.raises(InvalidRequest, match="logit_bias: token id") as info:
        engine.validate(_request(tok, "v", "x", SamplingParams(logit_bias={100000: 1.0}), mode="off"))
    assert info.value.field == "logit_bias"
    with pytest.raises(InvalidRequest, match="allowed_token_ids: token id 100000") as info:
        engine.validate(_request(tok, "v", "x", SamplingParams(allowed_token_ids=[5, 100000]), mode="off"))
    assert info.value.field == "allowed_token_ids"
    with pytest.raises(InvalidRequest, match="bad_words: token id 100000") as info:
        engine.validate(_request(tok, "v", "x", SamplingParams(bad_words_ids=[(5, 100000)]), mode="off"))
    assert info.value.field == "bad_words"
    with pytest.raises(InvalidRequest, match="only tokens that end") as info:   # nothing min_tokens leaves to sample
        engine.validate(_request(tok, "v", "x", SamplingParams(allowed_token_ids=[2, 5], stop_token_ids=[5],
                                                               min_tokens=1), mode="off"))
    assert info.value.field == "allowed_token_ids"
    engine.validate(_request(tok, "v", "x", SamplingParams(allowed_token_ids=[2, 5], min_tokens=1), mode="off"))
    with pytest.raises(InvalidRequest, match="only tokens that bad_words ban") as info:   # the sampler's token 0
        engine.validate(_request(tok, "v", "x", SamplingParams(allowed_token_ids=[5, 7], bad_words_ids=[(5,), (7,)]),
                                 mode="off"))
    assert info.value.field == "allowed_token_ids"
    with pytest.raises(InvalidRequest, match="only tokens that end"):
        engine.validate(_request(tok, "v", "x", SamplingParams(allowed_token_ids=[2, 5], bad_words_ids=[(5,)],
                                                               min_tokens=1), mode="off"))
    engine.validate(_request(tok, "v", "x", SamplingParams(allowed_token_ids=[5, 7], bad_words_ids=[(5,), (3, 7)]),
                             mode="off"))   # a longer word bans 7 only after 3
    with pytest.raises(InvalidRequest, match="min_tokens") as info:
        SamplingParams(max_tokens=3, min_tokens=4)
    assert info.value.field == "min_tokens"


def test_sampling_defaults_are_the_generation_configs_sampling_fields_in_range():
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from atv_core.engine.llm_engine import sampling_defaults
    config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=7, bos_token_id=1)
    assert sampling_defaults(SimpleNamespace(generation_config=config)) == {"temperature": 0.6, "top_p": 0.9,
                                                                            "top_k": 20, "max_new_tokens": 7}
    bad = GenerationConfig(do_sample=True, top_p=1.5, repetition_penalty=1.2)   # a top_p no request could send
    assert sampling_defaults(SimpleNamespace(generation_config=bad)) == {"repetition_penalty": 1.2}
    assert sampling_defaults(SimpleNamespace()) == {}
