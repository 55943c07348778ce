"""Generator (pooling, expansion, gate) and checkpoint round trips on tiny backbones."""
import json

import pytest
import torch

from atv_core.steering.checkpoint import load_generator, read_config, save_generator
from atv_core.steering.generator import ATVGenerator, GeneratorConfig, pool
from tests.tiny import make_model, make_tiny_model_dir


def _generator(tmp_path, kind="encoder", rank=8, layers=None, **kw):
    arch = "bert" if kind == "encoder" else "gpt2"
    backbone_dir = make_tiny_model_dir(tmp_path / f"backbone-{arch}", arch)
    config = GeneratorConfig(backbone=str(backbone_dir), target="tiny-llama", target_layers=3, target_hidden=32,
                             layers=layers, backbone_kind=kind, rank=rank, **kw)
    from atv_core.models import load_backbone
    backbone, tokenizer = load_backbone(str(backbone_dir))
    generator = ATVGenerator(config, backbone, tokenizer)
    with torch.no_grad():
        for p in generator.expansion.parameters():
            p.normal_(0, 0.5)
    return generator.eval()


def test_pooling_modes():
    hidden = torch.arange(12.0).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(pool(hidden, left, "last")[0], hidden[0, 2])
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])


@pytest.mark.parametrize("kind,rank,layers", [("encoder", 8, None), ("decoder", None, (0, 2))])
def test_shapes_and_padding_invariance(tmp_path, kind, rank, layers):
    generator = _generator(tmp_path, kind, rank, layers)
    with torch.no_grad():
        both = generator(["short", "a much longer query than the other one"])
        alone = generator(["short"])
    n_layers = len(layers) if layers else 3
    assert both.vectors.shape == (2, n_layers, 32)
    torch.testing.assert_close(both.vectors[0], alone.vectors[0], atol=1e-5, rtol=1e-5)  # padding does not leak


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_packed_encoding_equals_each_prompt_encoded_alone(tmp_path, kind, pooling):
    """Prompts are packed into shared sequences (block-diagonal mask, positions restarting per prompt); each
    pooled state must equal a plain forward of that prompt alone, whatever the pack budget."""
    generator = _generator(tmp_path, kind, pooling=pooling)
    prompts = ["short", "a much longer query than the other one", "x", "three words here", ""]
    ids = generator.tokenizer(prompts)["input_ids"]
    with torch.no_grad():
        alone = []
        for row in ids:
            hidden = generator.backbone(input_ids=torch.tensor([row or [generator.tokenizer.pad_token_id]])).last_hidden_state[0]
            alone.append({"mean": hidden.mean(0), "last": hidden[-1], "cls": hidden[0]}[pooling])
        alone = torch.stack(alone)
        for budget in (1, 8, 1024):   # one prompt per pack, a few per pack, all in one
            torch.testing.assert_close(generator.encode(prompts, pack_tokens=budget), alone, atol=1e-5, rtol=1e-5)


def test_untrained_generator_steers_nothing(tmp_path):
    backbone_dir = make_tiny_model_dir(tmp_path / "b", "bert")
    from atv_core.models import load_backbone
    backbone, tok = load_backbone(str(backbone_dir))
    gen = ATVGenerator(GeneratorConfig(str(backbone_dir), "t", 3, 32), backbone, tok)
    assert torch.equal(gen(["anything"]).vectors, torch.zeros(1, 3, 32))


def test_input_template_is_applied(tmp_path):
    generator = _generator(tmp_path, input_template="Query: {prompt}")
    assert generator.format_inputs(["x"]) == ["Query: x"]


def test_distance_gate_steps_back_far_from_training_queries(tmp_path):
    generator = _generator(tmp_path, gate="distance", gate_threshold=0.9, gate_temperature=0.01)
    with torch.no_grad():
        near = generator.encode(["positive review"])
        generator.centroids = torch.nn.functional.normalize(near, dim=-1)
        g_near = generator(["positive review"]).gates
        g_far = generator(["zzzz qqqq 1234 %%%%"]).gates
    assert g_near.item() > 0.99 and g_far.item() < g_near.item()


def test_checkpoint_round_trip_gives_identical_vectors(tmp_path):
    generator = _generator(tmp_path, gate="distance")
    generator.centroids = torch.randn(4, generator.backbone.config.hidden_size)
    path = save_generator(generator, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["atv_config.json", "atv_weights.safetensors"]
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}   # safetensors alone would write 0600
    assert modes["atv_weights.safetensors"] == modes["atv_config.json"] and modes["atv_config.json"] & 0o044
    loaded = load_generator(path, target=make_model("llama"))
    assert loaded.config == generator.config
    prompts = ["hello", "what is the capital of France?"]
    with torch.no_grad():
        assert torch.equal(loaded(prompts).vectors, generator(prompts).vectors)
    meta = json.loads((path / "atv_config.json").read_text())
    assert meta["generator"]["position"] == "all" and meta["generator"]["input_template"] == "{prompt}"


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_backbone_layers_keeps_the_first_blocks_and_survives_a_round_trip(tmp_path, kind):
    from atv_core.steering.generator import backbone_blocks
    full = _generator(tmp_path / "full", kind)
    cut = _generator(tmp_path / "cut", kind, backbone_layers=1, backbone_trainable_layers=1)
    n_full = len(backbone_blocks(full.backbone))
    assert n_full >= 2 and len(backbone_blocks(cut.backbone)) == 1
    ids = torch.tensor([cut.tokenizer("a query")["input_ids"]])
    with torch.no_grad():
        # the cut backbone's last hidden state is the full one's after block 0 (before any final norm)
        first = full.backbone(input_ids=ids, output_hidden_states=True).hidden_states[1]
        if kind == "encoder":
            torch.testing.assert_close(cut.backbone(input_ids=ids).last_hidden_state, first)
        torch.nn.init.normal_(backbone_blocks(cut.backbone)[0].output.dense.weight if kind == "encoder"
                              else backbone_blocks(cut.backbone)[0].mlp.c_proj.weight)   # "fine-tuned"
    path = save_generator(cut, tmp_path / "ckpt")
    loaded = load_generator(path)
    assert loaded.config.backbone_layers == 1 and len(backbone_blocks(loaded.backbone)) == 1
    with torch.no_grad():
        assert torch.equal(loaded(["a query", "another"]).vectors, cut(["a query", "another"]).vectors)
    with pytest.raises(ValueError, match=f"backbone_layers={n_full + 1} but the backbone has {n_full} blocks"):
        _generator(tmp_path / "big", kind, backbone_layers=n_full + 1)


def test_checkpoint_refuses_a_target_with_other_shapes(tmp_path):
    path = save_generator(_generator(tmp_path), tmp_path / "ckpt")
    other = make_model("llama", layers=4, hidden=48)
    with pytest.raises(ValueError, match=r"3 layers x hidden 32.*4 layers x hidden 48"):
        load_generator(path, target=other)


def test_bad_configs_and_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="input_template"):
        GeneratorConfig("b", "t", 3, 32, input_template="no placeholder")
    with pytest.raises(ValueError, match="layers must be distinct"):
        GeneratorConfig("b", "t", 3, 32, layers=(0, 5))
    with pytest.raises(ValueError, match="position"):
        GeneratorConfig("b", "t", 3, 32, position="first")
    with pytest.raises(ValueError, match="unknown generator config keys"):
        GeneratorConfig.from_dict({"backbone": "b", "target": "t", "target_layers": 3, "target_hidden": 32, "x": 1})
    with pytest.raises(ValueError, match="not an ATV generator checkpoint"):
        read_config(tmp_path)


def test_unreadable_checkpoints_are_refused_with_the_file_and_the_fix(tmp_path):
    path = save_generator(_generator(tmp_path), tmp_path / "run" / "generator")
    with pytest.raises(ValueError, match=r"is one \(an `atv train` output folder holds the checkpoint in generator/"):
        read_config(tmp_path / "run")
    config_file = path / "atv_config.json"
    meta = json.loads(config_file.read_text())
    for broken, said in (("{", "not valid JSON"), ("{}", "expected an object with a 'generator' object"),
                         (json.dumps({**meta, "format_version": 2}), "format_version 2, but this version of atv reads 1"),
                         (json.dumps({**meta, "generator": {**meta["generator"], "rank": "64"}}), r"atv_config.json: "),
                         (json.dumps({**meta, "generator": {"backbone": "b"}}), r"atv_config.json: .*target")):
        config_file.write_text(broken)
        with pytest.raises(ValueError, match=said):
            read_config(path)
    other_rank = {**meta["generator"], "rank": meta["generator"]["rank"] + 1}
    config_file.write_text(json.dumps({**meta, "generator": other_rank}))
    with pytest.raises(ValueError, match="its weights do not match its atv_config.json"):
        load_generator(path)


def test_build_engine_names_the_part_that_failed(tmp_path):
    from atv_core.engine.build import LoadError, build_engine
    from atv_core.engine.llm_engine import EngineConfig
    model = str(make_tiny_model_dir(tmp_path / "m"))
    with pytest.raises(LoadError, match=r"^generator '.*nowhere': .*nowhere is not an ATV generator checkpoint"):
        build_engine(model, str(tmp_path / "nowhere"), device="cpu", dtype="float32")
    with pytest.raises(LoadError, match=r"^vectors '.*novecs': vectors folder .*novecs does not exist"):
        build_engine(model, "none", device="cpu", dtype="float32", vectors=str(tmp_path / "novecs"))
    with pytest.raises(LoadError, match=r"^engine settings: max_model_len 100000 exceeds"):
        build_engine(model, "none", device="cpu", dtype="float32", config=EngineConfig(max_model_len=100000))
    with pytest.raises(LoadError, match=r"^target 'embedded:nope': unknown embedded model"):
        build_engine("embedded:nope", "none", device="cpu")
    for template, error in (("{% if %}", "TemplateSyntaxError"), ("{{ messages[0]['content'] + 1 }}", "TypeError")):
        with pytest.raises(LoadError, match=rf"^chat template \(inline\): it does not render a one-message "
                                            rf"conversation: {error}"):
            build_engine(model, "none", device="cpu", dtype="float32", chat_template=template)
    with pytest.raises(LoadError, match=r"^chat template '.*absent.jinja': no file .*absent.jinja"):
        build_engine(model, "none", device="cpu", dtype="float32", chat_template=str(tmp_path / "absent.jinja"))


def test_chat_template_replaces_the_models_inline_or_from_a_file(tmp_path):
    from atv_core.engine.build import build_engine
    model = str(make_tiny_model_dir(tmp_path / "m"))
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    (tmp_path / "t.jinja").write_text(template)
    for given in (template, str(tmp_path / "t.jinja")):
        engine = build_engine(model, "none", device="cpu", dtype="float32", chat_template=given)
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert text == "[user] hi\n[assistant]", given


def test_no_pickle_in_checkpoints(tmp_path):
    path = save_generator(_generator(tmp_path), tmp_path / "ckpt")
    assert not list(path.glob("*.pt")) and not list(path.glob("*.bin")) and not list(path.glob("*.pkl"))


def test_format_input_is_the_query_alone_without_examples_and_one_line_per_demonstration(tmp_path):
    from atv_core.engine.request import Example
    generator = _generator(tmp_path, max_examples=2)
    assert generator.format_input("Input: hot\nOutput:") == "Input: hot\nOutput:"
    text = generator.format_input("Q {prompt}", [Example("big\none", "small"), Example("{examples}", "down")])
    assert text == "Q {prompt}\n\nExamples:\nbig one => small\n{examples} => down"
    with pytest.raises(ValueError, match="at most 2"):
        generator.format_input("q", [Example("a", "b")] * 3)
    with pytest.raises(ValueError, match="not trained to read atv.examples"):
        _generator(tmp_path / "plain").format_input("q", [Example("a", "b")])


def test_examples_change_the_vector(tmp_path):
    from atv_core.engine.request import Example
    generator = _generator(tmp_path, max_examples=5)
    with torch.no_grad():
        a, b = generator([generator.format_input("x", [Example("hot", "cold")]), "x"]).vectors
    assert not torch.equal(a, b)


def test_learned_gate_and_tuned_backbone_blocks_round_trip(tmp_path):
    generator = _generator(tmp_path, gate="learned", backbone_trainable_layers=1)
    tuned = [n for n, p in generator.backbone.named_parameters() if p.requires_grad]
    assert tuned and all(n.startswith("encoder.layer.1.") for n in tuned)   # the top block of 2 only
    with torch.no_grad():
        for p in list(generator.gate_head.parameters()) + [p for _, p in generator.backbone.named_parameters()
                                                           if p.requires_grad]:
            p.add_(torch.randn_like(p) * 0.3)
    path = save_generator(generator, tmp_path / "ckpt")
    stored = load_file_keys(path)
    assert any(k.startswith("gate_head.") for k in stored)
    assert {k for k in stored if k.startswith("backbone.")} == {f"backbone.{n}" for n in tuned}
    loaded = load_generator(path, target=make_model("llama"))
    prompts = ["hello", "what is the capital of France?"]
    with torch.no_grad():
        out, ref = loaded(prompts), generator(prompts)
    assert torch.equal(out.vectors, ref.vectors) and torch.equal(out.gates, ref.gates)
    assert ((out.gates > 0) & (out.gates < 1)).all() and not torch.equal(out.gates[0], out.gates[1])


def test_old_checkpoints_without_the_new_fields_still_load(tmp_path):
    path = save_generator(_generator(tmp_path, gate="distance"), tmp_path / "ckpt")
    meta = json.loads((path / "atv_config.json").read_text())
    for key in ("backbone_trainable_layers", "max_examples", "examples_format", "example_template"):
        del meta["generator"][key]
    (path / "atv_config.json").write_text(json.dumps(meta))
    loaded = load_generator(path)
    assert loaded.config.max_examples == 0 and not loaded.config.reads_examples and loaded.gate_head is None


def load_file_keys(path):
    from safetensors.torch import load_file
    return set(load_file(str(path / "atv_weights.safetensors")))


@pytest.mark.parametrize("rank", [0, 8])
def test_bank_mixes_learned_vectors_by_the_query_and_survives_a_round_trip(tmp_path, rank):
    """bank_size K: v = direct(q) + softmax(router(q)) @ B; rank 0 leaves the bank alone, so each vector is a
    convex mixture of the K rows of B (a one-hot router picks one row exactly)."""
    backbone_dir = make_tiny_model_dir(tmp_path / "b", "bert")
    from atv_core.models import load_backbone
    backbone, tok = load_backbone(str(backbone_dir))
    config = GeneratorConfig(str(backbone_dir), "tiny-llama", 3, 32, rank=rank, bank_size=4)
    generator = ATVGenerator(config, backbone, tok).eval()
    prompts = ["hello", "what is the capital of France?"]
    with torch.no_grad():
        assert torch.equal(generator(prompts).vectors, torch.zeros(2, 3, 32))     # untrained: steers nothing
        for p in generator.expansion.parameters():
            p.normal_(0, 0.5)
        out = generator(prompts)
        weights = (generator.expansion.router(out.pooled) / 0.1).softmax(-1)        # [2, 4], temperature 0.1
        mixed = (weights @ generator.expansion.bank).view(2, 3, 32)
        direct = generator.expansion.up(generator.expansion.down(out.pooled)).view(2, 3, 32) if rank else 0
        torch.testing.assert_close(out.vectors, mixed + direct)
        if not rank:
            generator.expansion.router.weight.zero_()
            generator.expansion.router.bias.copy_(torch.tensor([0.0, 1e4, 0.0, 0.0]))   # one-hot on row 1
            assert torch.equal(generator(prompts).vectors, generator.expansion.bank[1].view(1, 3, 32).expand(2, 3, 32))
    path = save_generator(generator, tmp_path / "ckpt")
    loaded = load_generator(path, target=make_model("llama"))
    assert loaded.config.bank_size == 4 and loaded.config.rank == rank
    with torch.no_grad():
        assert torch.equal(loaded(prompts).vectors, generator(prompts).vectors)


def test_rank_zero_needs_a_bank():
    with pytest.raises(ValueError, match="0 with bank_size > 0"):
        GeneratorConfig("b", "t", 3, 32, rank=0)
    with pytest.raises(ValueError, match="bank_size must be >= 0"):
        GeneratorConfig("b", "t", 3, 32, bank_size=-1)
    with pytest.raises(ValueError, match="bank_temperature > 0"):
        GeneratorConfig("b", "t", 3, 32, bank_size=4, bank_temperature=0)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_packed_attention_runs_per_prompt_and_matches_the_block_diagonal_mask(tmp_path, kind, monkeypatch):
    """The backbone is switched to packing.packed_attention; a packed forward attends per prompt (length
    classes, padded keys masked, causal for decoders) and gives the states of the [N, N] block-diagonal mask."""
    from atv_core.steering import packing
    generator = _generator(tmp_path, kind)
    assert generator.packed_attention and generator.backbone.config._attn_implementation == packing.ATTENTION
    prompts = ["short", "shorter", "a much longer query than the other one", "x", "three words here", "", "four words are here!"]
    calls = []
    attend = packing.Packing.attend
    monkeypatch.setattr(packing.Packing, "attend", lambda self, *a: calls.append(len(self.groups)) or attend(self, *a))
    with torch.no_grad():
        packed = generator.encode(prompts)
        assert calls and max(calls) > 1   # several length classes, one call per layer
        generator.packed_attention = False
        masked = generator.encode(prompts)
    torch.testing.assert_close(packed, masked, atol=1e-5, rtol=1e-5)


def test_packing_plan_groups_prompts_by_length_class():
    from atv_core.steering.packing import Packing
    plan = Packing.build([3, 1, 4, 2, 8], causal=False)
    assert [g.shape for g in plan.groups] == [(1, 1), (1, 2), (2, 4), (1, 8)]
    group = plan.groups[2]   # prompts 0 (tokens 0-2, one pad) and 2 (tokens 4-7)
    assert group.gather.tolist() == [0, 1, 2, 0, 4, 5, 6, 7]
    assert group.keys.flatten().tolist() == [True, True, True, False, True, True, True, True]
    rows = torch.cat([g.gather if g.keep is None else g.gather.index_select(0, g.keep) for g in plan.groups])
    assert torch.equal(rows[plan.order], torch.arange(18))   # every token back in its place
    causal = Packing.build([3, 1, 4, 2, 8], causal=True)   # is_causal keeps real queries off the right padding
    assert [g.gather.tolist() for g in causal.groups] == [g.gather.tolist() for g in plan.groups]
    assert all(g.keys is None for g in causal.groups)


def test_a_backbone_attention_packing_cannot_honour_falls_back_to_the_mask(tmp_path, monkeypatch, caplog):
    """An attention that needs a sliding window (or a position bias, soft-capping) makes packed_attention
    refuse; encode() then uses the block-diagonal mask from then on, with the same states."""
    import logging

    from transformers import AttentionInterface

    from atv_core.steering import packing
    generator = _generator(tmp_path)
    prompts = ["short", "shorter", "a much longer query than the other one"]
    with torch.no_grad():
        want = generator.encode(prompts)
        attention = packing.packed_attention
        monkeypatch.setitem(AttentionInterface._global_mapping, packing.ATTENTION,
                            lambda *a, **k: attention(*a, sliding_window=4, **k))
        with caplog.at_level(logging.INFO, logger="atv.generator"):
            got = generator.encode(prompts)
    assert not generator.packed_attention and "sliding_window" in caplog.text
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
