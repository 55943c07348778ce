"""Named vectors on tiny models: folder loading and validation, reload, engine parity with `Request.vector`,
the weighted sum with the generator's vector, and `atv vectors build|list` end to end."""
import json
import logging
import threading
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from atv_core.cli import main as atv_main
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.engine.request import Request, SamplingParams, SteeringSpec
from atv_core.steering.checkpoint import load_generator
from atv_core.steering.vectors import VectorLayout, VectorStore, read_folder, write_vector
from atv_core.tools.evaluate import static_task_vector
from atv_core.tools.tasks import load_task_file
from tests.tiny import drain, make_model, make_tiny_generator_dir, make_tiny_model_dir, make_tokenizer, record_logits

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LAYOUT = VectorLayout(target_layers=3, layers=(0, 1, 2), hidden_size=32, target="tiny-llama")  # make_model("llama")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    model = make_model("llama")
    generator = load_generator(make_tiny_generator_dir(tmp_path_factory.mktemp("g") / "gen"), target=model)
    return model, make_tokenizer(), generator


def _vector(seed: int, shape=(3, 32)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _folder(tmp_path, **vectors):
    for name, vector in vectors.items():
        write_vector(tmp_path, name, vector, LAYOUT, {"recipe": "test"})
    return tmp_path


def _request(tok, rid, spec, vector=None, text="steer this prompt"):
    return Request(rid, tok(text)["input_ids"], GREEDY, spec, text, vector=vector)


def _run(parts, store, *requests):
    model, tok, gen = parts
    engine = LLMEngine(model, tok, gen, EngineConfig(max_running=8), vectors=store)
    logits = record_logits(engine)
    for request in requests:
        engine.add_request(request)
    drain(engine)
    return logits


# ---- the folder -----------------------------------------------------------------------------------
def test_store_loads_validates_and_reloads(tmp_path):
    a, b = _vector(1), _vector(2)
    store = VectorStore(_folder(tmp_path, alpha=a), LAYOUT)
    assert store.names() == ["alpha"] and torch.equal(store.get("alpha").vector, a)
    meta = store.get("alpha").meta
    assert meta["layers"] == [0, 1, 2] and meta["hidden_size"] == 32 and meta["target"] == "tiny-llama"
    assert meta["norm"] == pytest.approx(float(a.norm())) and meta["built_from"] == {"recipe": "test"}
    write_vector(tmp_path, "beta", b, LAYOUT, {})
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777   # noqa: E731
    assert mode("beta.safetensors") == mode("beta.json") and mode("beta.json") & 0o044   # readable by a server's user
    assert "beta" not in store                       # nothing changes until reload()
    assert store.reload() == ["alpha", "beta"] and torch.equal(store.get("beta").vector, b)
    (tmp_path / "beta.safetensors").unlink()
    (tmp_path / "beta.json").unlink()
    assert store.reload() == ["alpha"] and store.get("beta") is None


def test_the_position_policy_is_recorded_and_a_mismatch_is_logged(parts, tmp_path, caplog):
    model, _, gen = parts
    layout = VectorLayout.for_target(model, gen)
    assert layout.position == gen.config.position == "all" and VectorLayout.for_target(model).position == "all"
    last = load_generator(make_tiny_generator_dir(tmp_path / "last", position="last"), target=model)
    assert VectorLayout.for_target(model, last).position == "last" == LLMEngine(model, parts[1], last).runner.position
    folder = tmp_path / "vectors"
    write_vector(folder, "alpha", _vector(1), replace(layout, position="last"), {})
    assert json.loads((folder / "alpha.json").read_text())["position"] == "last"
    with caplog.at_level(logging.WARNING, logger="atv.vectors"):
        VectorStore(folder, layout)
    assert "built under position policy 'last'; this server adds vectors under 'all'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="atv.vectors"):
        VectorStore(folder, replace(layout, position="last"))
    assert "position policy" not in caplog.text


def test_a_bad_file_fails_the_reload_and_keeps_the_old_set(tmp_path):
    store = VectorStore(_folder(tmp_path, alpha=_vector(1)), LAYOUT)
    wide = VectorLayout(3, (0, 1, 2), 16)
    write_vector(tmp_path, "narrow", _vector(3, (3, 16)), wide, {})
    with pytest.raises(ValueError) as err:
        store.reload()
    message = str(err.value)
    assert "narrow.safetensors" in message and "[3, 16]" in message and "expected [3, 32]" in message
    assert store.names() == ["alpha"]
    with pytest.raises(ValueError, match="narrow.safetensors"):
        VectorStore(tmp_path, LAYOUT)


def _write_raw(folder, name, tensors: dict, meta: dict | None = None):
    save_file(tensors, str(folder / f"{name}.safetensors"))
    meta = {"target_layers": 3, "hidden_size": 32, "layers": [0, 1, 2]} if meta is None else meta
    (folder / f"{name}.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case, expected", [
    ("nan", "NaN or infinite"),
    ("two_tensors", "exactly one tensor named 'vector'"),
    ("wrong_meta_layers", "does not fit this server: expected [3, 32]"),
    ("meta_disagrees", "disagrees with its metadata"),
    ("integer", "2-D float tensor"),
    ("no_json", "bad.json is missing"),
    ("orphan_json", "bad.json has no bad.safetensors"),
    ("bad_name", "not usable"),
])
def test_malformed_vectors_are_refused_with_the_file_named(tmp_path, case, expected):
    v = _vector(0)
    if case == "nan":
        _write_raw(tmp_path, "bad", {"vector": v.clone().index_fill_(1, torch.tensor([3]), float("nan"))})
    elif case == "two_tensors":
        _write_raw(tmp_path, "bad", {"vector": v, "other": v.clone()})
    elif case == "wrong_meta_layers":   # right shape, but made for other layers of a deeper target
        _write_raw(tmp_path, "bad", {"vector": v}, {"target_layers": 6, "hidden_size": 32, "layers": [3, 4, 5]})
    elif case == "meta_disagrees":
        _write_raw(tmp_path, "bad", {"vector": v}, {"target_layers": 3, "hidden_size": 32, "layers": [0, 1]})
    elif case == "integer":
        _write_raw(tmp_path, "bad", {"vector": torch.ones(3, 32, dtype=torch.int32)})
    elif case == "no_json":
        save_file({"vector": v}, str(tmp_path / "bad.safetensors"))
    elif case == "orphan_json":
        (tmp_path / "bad.json").write_text("{}")
    elif case == "bad_name":
        _write_raw(tmp_path, "-bad", {"vector": v})
    with pytest.raises(ValueError) as err:
        read_folder(tmp_path, LAYOUT)
    assert expected in str(err.value) and "bad" in str(err.value)


class _Payload:  # unpickling this would create the marker file
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"vector": _Payload(marker)}, tmp_path / "evil.safetensors")
    (tmp_path / "evil.json").write_text(json.dumps({"target_layers": 3, "hidden_size": 32, "layers": [0, 1, 2]}))
    with pytest.raises(ValueError, match="evil.safetensors: not a readable safetensors file"):
        read_folder(tmp_path, LAYOUT)
    assert not marker.exists()


def test_reads_during_reloads_see_a_whole_set(tmp_path):
    store = VectorStore(_folder(tmp_path, alpha=_vector(1)), LAYOUT)
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(tuple(store.names()))
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(10):
            if i % 2 == 0:
                write_vector(tmp_path, "beta", _vector(2), LAYOUT, {})
            else:
                (tmp_path / "beta.json").unlink()
                (tmp_path / "beta.safetensors").unlink()
            store.reload()
    finally:
        stop.set()
        thread.join()
    assert seen <= {("alpha",), ("alpha", "beta")} and ("alpha",) in seen


# ---- the engine -----------------------------------------------------------------------------------
def test_named_vector_gives_the_same_logits_as_the_tensor_passed_directly(parts, tmp_path):
    tok = parts[1]
    n = _vector(5) * 0.5
    store = VectorStore(_folder(tmp_path, task=n), LAYOUT)
    by_name = _request(tok, "name", SteeringSpec("vector", scale=1.5, vector="task"))
    direct = _request(tok, "direct", SteeringSpec("atv", scale=1.5), vector=n.clone())
    off = _request(tok, "off", SteeringSpec("off"))
    named_logits = _run(parts, store, by_name)["name"]
    direct_logits = _run(parts, None, direct)["direct"]
    off_logits = _run(parts, None, off)["off"]
    assert len(named_logits) == len(direct_logits) == GREEDY.max_tokens
    assert all(torch.equal(a, b) for a, b in zip(named_logits, direct_logits))
    assert by_name.output_ids == direct.output_ids
    assert not torch.equal(named_logits[0], off_logits[0])
    info = by_name.steering_report
    assert info.vector == "task" and info.gate is None and info.vector_norm == pytest.approx(1.5 * n.norm())


def test_generated_plus_weighted_named_vector(parts, tmp_path):
    _, tok, generator = parts
    n = _vector(6) * 0.5
    store = VectorStore(_folder(tmp_path, task=n), LAYOUT)
    text = "steer this prompt"
    with torch.no_grad():
        g = generator([text]).vectors.float()[0]
    both = _request(tok, "both", SteeringSpec("atv", scale=2.0, vector="task", vector_weight=0.25))
    summed = _request(tok, "sum", SteeringSpec("atv", scale=2.0), vector=g + n * 0.25)
    generated = _request(tok, "gen", SteeringSpec("atv", scale=2.0))
    logits = _run(parts, store, both)["both"]
    reference = _run(parts, None, summed)["sum"]
    alone = _run(parts, None, generated)["gen"]
    assert all(torch.equal(a, b) for a, b in zip(logits, reference))
    assert not torch.equal(logits[0], alone[0])
    assert both.steering_report.vector_norm == summed.steering_report.vector_norm
    assert both.steering_report.gate == generated.steering_report.gate and both.steering_report.generator_s > 0


def test_precomputed_vector_plus_named_vector(parts, tmp_path):
    tok = parts[1]
    g, n = _vector(7) * 0.3, _vector(8) * 0.3
    store = VectorStore(_folder(tmp_path, task=n), LAYOUT)
    both = _request(tok, "both", SteeringSpec("atv", scale=0.5, vector="task", vector_weight=-1.0), vector=g)
    summed = _request(tok, "sum", SteeringSpec("atv", scale=0.5), vector=g + n * -1.0)
    assert all(torch.equal(a, b) for a, b in zip(_run(parts, store, both)["both"], _run(parts, None, summed)["sum"]))


def test_validate_names_the_known_vectors(parts, tmp_path):
    model, tok, gen = parts
    store = VectorStore(_folder(tmp_path, alpha=_vector(1), beta=_vector(2)), LAYOUT)
    engine = LLMEngine(model, tok, gen, EngineConfig(max_running=4), vectors=store)
    with pytest.raises(ValueError, match=r"unknown vector 'gamma'; this server has: alpha, beta"):
        engine.validate(_request(tok, "x", SteeringSpec("vector", vector="gamma")))
    with pytest.raises(ValueError, match="no named vectors"):
        LLMEngine(model, tok, gen).validate(_request(tok, "x", SteeringSpec("vector", vector="alpha")))
    with pytest.raises(ValueError, match="mode 'vector' does not use"):
        engine.validate(_request(tok, "x", SteeringSpec("vector", vector="alpha"), vector=_vector(0)))
    engine.validate(_request(tok, "x", SteeringSpec("off", vector="gamma")))   # off ignores the name
    no_generator = LLMEngine(model, tok, None, vectors=store)
    no_generator.validate(_request(tok, "x", SteeringSpec("vector", vector="alpha")))


def test_a_vector_removed_by_a_reload_fails_only_its_request(parts, tmp_path):
    model, tok, gen = parts
    store = VectorStore(_folder(tmp_path, alpha=_vector(1), beta=_vector(2)), LAYOUT)
    engine = LLMEngine(model, tok, gen, EngineConfig(max_running=4), vectors=store)
    doomed = _request(tok, "d", SteeringSpec("vector", vector="beta"))
    kept = _request(tok, "k", SteeringSpec("vector", vector="alpha"))
    outputs = []
    doomed.on_output = outputs.append
    engine.add_request(doomed)
    engine.add_request(kept)
    (tmp_path / "beta.safetensors").unlink()
    (tmp_path / "beta.json").unlink()
    store.reload()
    drain(engine)
    assert doomed.finish_reason == "error" and "'beta' was removed" in doomed.error
    assert outputs[-1].finished and outputs[-1].error_field == "atv.vector" and kept.error_field is None
    from server.openai_api import failed_error   # the request's own fault: a 400 on atv.vector
    refusal = failed_error(outputs[-1])
    assert (refusal.status, refusal.param) == (400, "atv.vector") and "'beta' was removed" in refusal.message
    assert kept.finish_reason == "length" and len(kept.output_ids) == GREEDY.max_tokens
    assert engine.runner.slots_used == 0


def test_engine_refuses_a_store_made_for_other_layers(parts, tmp_path):
    model, tok, _ = parts
    subset = load_generator(make_tiny_generator_dir(tmp_path / "sub", layers=(0, 2)), target=model)
    assert VectorLayout.for_target(model, subset).shape == (2, 32)
    store = VectorStore(_folder(tmp_path / "v", alpha=_vector(1)), LAYOUT)
    with pytest.raises(ValueError, match=r"validated for \[3, 32\].*this engine steers \[2, 32\]"):
        LLMEngine(model, tok, subset, vectors=store)


# ---- atv vectors build | list ---------------------------------------------------------------------
def test_build_and_list_end_to_end(tmp_path, capsys):
    model_dir = make_tiny_model_dir(tmp_path / "target", "llama")
    gen_dir = make_tiny_generator_dir(tmp_path / "gen")
    task_file = tmp_path / "colours.jsonl"
    records = [{"input": f"thing number {i}", "output": "red" if i % 2 else "blue"} for i in range(30)]
    task_file.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "vectors"
    argv = ["vectors", "build", "--task-file", str(task_file), "--name", "colours", "--out", str(out),
            "--generator", str(gen_dir), "--model", str(model_dir), "--template", "Q: {input}\nA:", "--device", "cpu"]
    assert atv_main(argv) == 0
    meta = json.loads((out / "colours.json").read_text())
    task = load_task_file(task_file, templates=["Q: {input}\nA:"])
    train = task.examples("train")
    assert meta["built_from"]["queries"] == len(train) and 0 < len(train) < 30
    assert meta["built_from"]["recipe"] == "generator_mean" and meta["layers"] == [0, 1, 2]
    model = make_model("llama")
    expected = static_task_vector(task, load_generator(gen_dir, target=model))
    store = VectorStore(out, VectorLayout.for_target(model, None))
    assert torch.equal(store.get("colours").vector, expected) and expected.abs().sum() > 0

    assert atv_main(argv[:-2] + ["--examples", "4", "--name", "few", "--device", "cpu"]) == 0
    few = json.loads((out / "few.json").read_text())["built_from"]
    assert few["queries"] == 4 and few["recipe"] == "generator_mean_examples"
    with pytest.raises(SystemExit) as exists:
        atv_main(argv)
    assert exists.value.code == 2 and "exists" in capsys.readouterr().err

    assert atv_main(["vectors", "list", str(out)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing] == ["colours", "few"] and "[3, 32]" in listing[0]
    assert "position all" in listing[0]
    (out / "broken.safetensors").write_bytes(b"not a tensor file")
    (out / "broken.json").write_text(json.dumps(meta))
    assert atv_main(["vectors", "list", str(out)]) == 1
    broken = [line for line in capsys.readouterr().out.splitlines() if line.startswith("broken")]
    assert len(broken) == 1 and "INVALID" in broken[0] and "not a readable safetensors" in broken[0]


@pytest.mark.slow
def test_a_built_vector_fixes_the_answer_format_on_the_real_default(tmp_path):
    """The issue's acceptance at engine level: the plain SmolLM2 answers 'Q: What number comes after N?' in a
    sentence; the named vector built from the task's training split makes it answer the number."""
    from atv_core.engine.build import build_engine
    from atv_core.models import EMBEDDED_TARGET
    from atv_core.tools.evaluate import normalise
    from atv_core.tools.tasks import load_suite

    assert atv_main(["vectors", "build", "--task", "next_number", "--name", "next", "--out", str(tmp_path),
                     "--device", "cpu"]) == 0
    engine = build_engine(EMBEDDED_TARGET, "default", device="cpu", dtype="float32",
                          config=EngineConfig(max_running=32, max_waiting=1000), vectors=tmp_path)
    task = load_suite(names=["next_number"])[0]
    test = task.examples("test")[:40]
    params = SamplingParams(max_tokens=8, temperature=0.0, stop=("\n",))
    scores = {}
    for spec in (SteeringSpec("off"), SteeringSpec("vector", vector="next")):
        prompts = [task.prompt(e.input, 0) for e in test]
        requests = [Request(f"{spec.mode}{i}", engine.tokenizer(p)["input_ids"], params, spec, p)
                    for i, p in enumerate(prompts)]
        for request in requests:
            engine.add_request(request)
        drain(engine)
        scores[spec.mode] = sum(normalise(r.output_text) == e.output for r, e in zip(requests, test)) / len(test)
    assert scores["vector"] >= scores["off"] + 0.10, scores
