"""Prompt logprobs on the paged engine (tiny Llama): computed chunk by chunk, they equal a plain transformers
forward's log-softmax when unsteered, differ when a vector steers, survive any chunk size, and max_tokens 0
scores the prompt without sampling."""
from __future__ import annotations

import pytest
import torch

from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.engine.request import Request, SamplingParams, SteeringSpec
from atv_core.steering.vectors import VectorLayout, VectorStore, write_vector
from tests.tiny import drain, make_model, make_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog and then runs far away into the forest"
LAYOUT = VectorLayout(target_layers=3, layers=(0, 1, 2), hidden_size=32, target="tiny-llama")


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vectors")
    write_vector(folder, "push", 2.0 * torch.randn(3, 32, generator=torch.Generator().manual_seed(5)), LAYOUT, {})
    return VectorStore(folder, LAYOUT)


def _score(model, store, spec=SteeringSpec("off"), max_tokens=0, top=3, batched=None, neighbours=0):
    """(prompt ids, every output of the request) from an engine whose prompt chunks hold `batched` tokens."""
    tok = make_tokenizer()
    engine = LLMEngine(model, tok, None, EngineConfig(max_running=4, max_num_batched_tokens=batched,
                                                      long_prefill_chunk=batched), vectors=store)
    ids = tok(TEXT).input_ids
    outputs = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=top)
    engine.add_request(Request("scored", ids, params, spec, TEXT, on_output=outputs.append))
    for i in range(neighbours):   # unscored requests in the same batches
        engine.add_request(Request(f"n{i}", ids[: 5 + i], SamplingParams(max_tokens=3), SteeringSpec("off"), TEXT))
    drain(engine)
    return ids, outputs


def _reference(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)    # [T, V]


@pytest.mark.parametrize("batched", [None, 7, 16])
def test_unsteered_prompt_logprobs_equal_a_plain_forward(model, store, batched):
    ids, outputs = _score(model, store, batched=batched, neighbours=2)
    (out,) = outputs
    assert out.finished and out.finish_reason == "length" and out.token_ids == [] and out.completion_tokens == 0
    entries = out.prompt_logprobs
    assert len(ids) > 16 and [e.token_id for e in entries] == ids
    assert entries[0].logprob is None and entries[0].top == []
    ref = _reference(model, ids)
    got = torch.tensor([e.logprob for e in entries[1:]])
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    ranks = (ref[:-1] > want.unsqueeze(1)).sum(dim=1) + 1                # vLLM's rank: 1 + the more likely tokens
    assert [e.rank for e in entries[1:]] == ranks.tolist() and entries[0].rank is None
    assert len(set(ranks.tolist())) > 5                                  # (ranks of every kind in this prompt)
    for p, entry in enumerate(entries[1:]):
        top_values, top_ids = ref[p].topk(3)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in entry.top]), top_values, atol=1e-4, rtol=0)
        assert entry.text == make_tokenizer().decode([entry.token_id])


def test_steered_prompt_logprobs_differ(model, store):
    ids, (off,) = _score(model, store)
    _, (steered,) = _score(model, store, SteeringSpec("vector", vector="push"))
    a = torch.tensor([e.logprob for e in off.prompt_logprobs[1:]])
    b = torch.tensor([e.logprob for e in steered.prompt_logprobs[1:]])
    assert (a - b).abs().max() > 1e-2


def test_prompt_logprobs_come_once_beside_sampled_tokens(model, store):
    ids, outputs = _score(model, store, max_tokens=3, top=0, batched=7)
    assert [len(o.token_ids) for o in outputs] == [1, 1, 1] and outputs[-1].finish_reason == "length"
    assert [o.prompt_logprobs is not None for o in outputs] == [True, False, False]
    _, (scored_only,) = _score(model, store, top=0, batched=7)   # same chunks: the same numbers exactly
    assert [e.logprob for e in outputs[0].prompt_logprobs] == [e.logprob for e in scored_only.prompt_logprobs]
    assert all(e.top == [] for e in outputs[0].prompt_logprobs)


def test_max_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(max_tokens=0)
