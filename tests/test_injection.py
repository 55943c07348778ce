"""Injection hooks on tiny random models of four layouts: exactness, isolation, parity, KV cache, cleanup."""
import pytest
import torch
from torch import nn
from transformers import DynamicCache

from atv_core.steering.injection import make_table, prompt_slots, steering
from atv_core.steering.layers import find_decoder_layers
from tests.conftest import ARCHS
from tests.tiny import make_model


def _vectors(model, n, layers=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    n_layers = len(layers) if layers is not None else len(find_decoder_layers(model))
    return torch.randn(n, n_layers, model.config.hidden_size, generator=g)


def _capture(model, layers):
    """Hooks recording each block's output: 'raw' before steering hooks, 'out' after them."""
    blocks = find_decoder_layers(model)
    store = {"raw": {}, "out": {}}

    def rec(kind, i):
        def hook(_m, _i, output):
            store[kind][i] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook
    return store, [blocks[i].register_forward_hook(rec("raw", i)) for i in layers]


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_vectors_and_off_are_exactly_the_bare_model(arch):
    model = make_model(arch)
    ids = torch.randint(5, 200, (2, 9))
    bare = model(ids).logits
    slots = torch.tensor([[1] * 9, [2] * 9])
    with steering(model, make_table(torch.zeros(2, model.config.num_hidden_layers, model.config.hidden_size)), slots):
        zero = model(ids).logits
    with steering(model, None, None):
        off = model(ids).logits
    assert torch.equal(bare, zero) and torch.equal(bare, off)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["all", "last"])
def test_hooked_layer_is_base_plus_vector_exactly_and_nothing_else_moves(arch, policy):
    model = make_model(arch)
    n_layers = model.config.num_hidden_layers
    selected = [0, n_layers - 1]                       # layer 1 is not selected
    vectors = _vectors(model, 1, selected)
    table = make_table(vectors)
    lengths = [7, 4]                                   # row 1 is shorter (right padding) and unsteered
    ids = torch.randint(5, 200, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    slots = prompt_slots([1, 0], lengths, policy)
    store, handles = _capture(model, range(n_layers))
    blocks = find_decoder_layers(model)
    try:
        with steering(model, table, slots, selected):
            handles += [blocks[i].register_forward_hook(
                lambda _m, _i, o, i=i: store["out"].__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone()))
                for i in range(n_layers)]
            model(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    for i in range(n_layers):
        raw, out = store["raw"][i], store["out"][i]
        if i in selected:
            expected = raw + table[selected.index(i)][slots]
            assert torch.equal(out, expected)
            steered_positions = slots[0] > 0
            assert torch.equal(out[0, ~steered_positions], raw[0, ~steered_positions])
            assert not torch.equal(out[0, steered_positions], raw[0, steered_positions])
            if policy == "last":
                assert steered_positions.tolist() == [False] * 6 + [True]
        else:
            assert torch.equal(out, raw)
        assert torch.equal(out[1], raw[1])             # unsteered row and its padding: exactly nothing added


@pytest.mark.parametrize("arch", ARCHS)
def test_unsteered_row_equals_bare_model_in_a_mixed_batch(arch):
    model = make_model(arch)
    ids = torch.randint(5, 200, (2, 6))
    bare = model(ids).logits
    slots = torch.tensor([[1] * 6, [0] * 6])
    with steering(model, make_table(_vectors(model, 1)), slots):
        mixed = model(ids).logits
    assert torch.equal(mixed[1], bare[1]) and not torch.allclose(mixed[0], bare[0])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["all", "last"])
def test_batch_parity_with_different_vectors_and_lengths(arch, policy):
    model = make_model(arch)
    vectors = _vectors(model, 3)
    lengths = [5, 9, 3]
    prompts = [torch.randint(5, 200, (n,)) for n in lengths]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
        mask[b, : len(p)] = 1
    with steering(model, make_table(vectors), prompt_slots([1, 2, 3], lengths, policy)):
        batched = model(ids, attention_mask=mask).logits
    for b, p in enumerate(prompts):
        with steering(model, make_table(vectors[b: b + 1]), prompt_slots([1], [len(p)], policy)):
            alone = model(p[None]).logits[0]
        # fp32 matmuls over a different batch shape may differ in the last bits; 1e-5 is far below any signal
        torch.testing.assert_close(batched[b, : len(p)], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["all", "last"])
def test_incremental_decoding_with_kv_cache_matches_full_forward(arch, policy):
    model = make_model(arch)
    table = make_table(_vectors(model, 1))
    prompt = torch.randint(5, 200, (1, 6))
    new_tokens = torch.randint(5, 200, (1, 4))
    cache = DynamicCache(config=model.config)
    with steering(model, table, prompt_slots([1], [6], policy)):
        model(prompt, cache=cache, use_cache=True)
    for t in range(4):
        with steering(model, table, torch.ones(1, 1, dtype=torch.long)):
            step = model(new_tokens[:, t: t + 1], cache=cache, use_cache=True).logits[0, -1]
    full_ids = torch.cat([prompt, new_tokens], 1)
    full_slots = torch.cat([prompt_slots([1], [6], policy), torch.ones(1, 4, dtype=torch.long)], 1)
    with steering(model, table, full_slots):
        full = model(full_ids).logits[0, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_packed_layout_uses_the_same_op():
    model = make_model("llama")
    blocks = find_decoder_layers(model)
    table = make_table(_vectors(model, 2))
    slots = torch.tensor([[1, 1, 1, 2, 2, 0]])        # three sequences packed into [1, 6]
    seen = {}
    h = blocks[0].register_forward_hook(lambda _m, _i, o: seen.__setitem__("raw", o.clone()))
    try:
        with steering(model, table, slots):
            g = blocks[0].register_forward_hook(lambda _m, _i, o: seen.__setitem__("out", o.clone()))
            model(torch.randint(5, 200, (1, 6)), position_ids=torch.tensor([[0, 1, 2, 0, 1, 0]]))
            g.remove()
    finally:
        h.remove()
    assert torch.equal(seen["out"], seen["raw"] + table[0][slots])


class _TupleBlock(nn.Module):
    def forward(self, x):
        return (x * 2, "extra")


class _TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_TupleBlock(), _TupleBlock()])

    def forward(self, x):
        for block in self.layers:
            x, _ = block(x)
        return x


def test_tuple_outputs_are_steered_too():
    model = _TupleModel()
    x = torch.randn(1, 3, 4)
    table = make_table(torch.ones(1, 2, 4))
    with steering(model, table, torch.tensor([[1, 1, 0]])):
        y = model(x)
    expected = x.clone()
    expected[0, :2] = (x[0, :2] * 2 + 1) * 2 + 1
    expected[0, 2] = x[0, 2] * 4
    assert torch.equal(y, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_hook_survives_an_exception_in_the_forward(arch):
    model = make_model(arch)
    blocks = find_decoder_layers(model)
    with pytest.raises(ValueError, match="slot index has"):
        with steering(model, make_table(_vectors(model, 1)), torch.ones(1, 3, dtype=torch.long)):
            model(torch.randint(5, 200, (1, 5)))     # wrong slot shape: the hook raises inside the forward
    assert all(len(b._forward_hooks) == 0 for b in blocks)


def test_find_decoder_layers_paths_and_errors():
    assert len(find_decoder_layers(make_model("gpt2"))) == 3
    assert len(find_decoder_layers(make_model("gpt_neox"))) == 3
    model = _TupleModel()
    wrapper = nn.Module()
    wrapper.backbone = nn.Module()
    wrapper.backbone.blocks = model.layers
    with pytest.raises(ValueError, match="layers_path"):
        find_decoder_layers(wrapper)
    assert find_decoder_layers(wrapper, "backbone.blocks") is model.layers
    with pytest.raises(ValueError, match="does not name"):
        find_decoder_layers(wrapper, "backbone.nothing")


def test_bad_settings_are_refused_with_a_fix():
    model = make_model("llama")
    with pytest.raises(ValueError, match="position policy"):
        prompt_slots([1], [3], "middle")
    with pytest.raises(ValueError, match="layers are selected"):
        with steering(model, make_table(torch.zeros(1, 2, 32)), torch.zeros(1, 3, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with steering(model, make_table(torch.zeros(1, 1, 32)), torch.zeros(1, 3, dtype=torch.long), [7]):
            pass
