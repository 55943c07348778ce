"""The stronger recipe (examples, learned gate, static control) and the trustworthy evaluation on tiny models."""
import json
from argparse import Namespace

import pytest
import torch

from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.engine.request import chat_query
from atv_core.steering.checkpoint import load_generator
from atv_core.tools.evaluate import (differences, generic_check, paired_bootstrap, run_method, suite_and_files,
                                     test_prompts as make_test_prompts, with_demos)
from atv_core.tools.tasks import load_suite, load_task_file
from atv_core.tools.train import TrainConfig, chat_prompt, load_task_vectors, negative_items, train
from tests.tiny import make_model, make_tiny_generator_dir, make_tiny_model_dir, make_tokenizer


def _cfg(tmp_path, **kw):
    backbone = make_tiny_model_dir(tmp_path / "bert", "bert")
    base = dict(target="tiny", backbone=str(backbone), tasks=("antonym", "next_number"), max_per_task=12, epochs=2,
                batch_size=4, lr=5e-3, device="cpu", out=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


def _negatives(tmp_path, n=20):
    path = tmp_path / "neg.jsonl"
    path.write_text("".join(json.dumps({"kind": "chat", "prompt": f"Tell me a long story about thing {i}."}) + "\n"
                            for i in range(n)))
    return path


def test_every_item_under_every_template_and_icl_uses_the_query_template():
    task = load_suite(names=["antonym"])[0]
    items = make_test_prompts(task, limit=4)
    assert len(items) == 4 * len(task.templates)
    assert [t for _, _, t in items[:3]] == [0, 1, 2] and items[0][1] == items[2][1]   # item-major
    prompt, _, t = items[1]
    demos = task.examples("train")[:2]
    assert with_demos(task, t, prompt, demos).startswith(task.prompt(demos[0].input, 1) + " " + demos[0].output)
    assert len(make_test_prompts(task, limit=4, all_templates=False)) == 4


def _fake_results(a, b):
    return {"t1": {"atv": {"first": a, "em": a}, "icl": {"first": b, "em": b}}}


def test_paired_bootstrap_point_and_interval():
    tasks = [Namespace(name="t1", seen=True)]
    same = paired_bootstrap([_fake_results([1, 0, 1, 0], [0, 1, 0, 1])] * 2, tasks, "atv", "icl", "first")
    assert same[0] == 0.0 and same[1] < 0 < same[2]
    better = paired_bootstrap([_fake_results([1, 1, 1, 1], [0, 0, 0, 0])], tasks, "atv", "icl", "em")
    assert better == (1.0, 1.0, 1.0)
    mixed = paired_bootstrap([_fake_results([1, 1, 1, 0], [0, 0, 0, 0])], tasks, "atv", "icl", "first", reps=500)
    assert mixed[0] == 0.75 and 0 <= mixed[1] < 0.75 < mixed[2] <= 1
    table = differences([_fake_results([1, 1], [0, 1])], tasks, ["atv", "icl"])
    assert table["atv"]["icl"]["seen"]["first"][0] == 0.5 and "unseen" not in table["atv"]["icl"]


def test_shared_templates_and_scores_split_by_them(tmp_path):
    """A template two tasks use makes a prompt that does not name its task; scores and ATV's differences are
    also reported on own vs shared templates (template indices stored, or i mod the count for older results)."""
    from atv_core.tools.evaluate import by_template, by_template_table, plot_by_template, shared_templates
    generic = "Input: {input}\nOutput:"
    t1 = Namespace(name="t1", seen=True, templates=("A {input}", generic))
    t2 = Namespace(name="t2", seen=True, templates=(generic, "B {input}", "C {input}"))
    t3 = Namespace(name="t3", seen=False, templates=("D {input}",))
    assert shared_templates([t1, t2, t3]) == {("t1", 1), ("t2", 0)}
    r = {"t1": {"atv": {"first": [1, 0, 1, 0], "em": [1, 0, 1, 0]},            # no "templates": 0, 1, 0, 1
                "static": {"first": [1, 1, 1, 1], "em": [1, 1, 0, 1]}},
         "t2": {"atv": {"first": [0, 1, 1], "em": [0, 1, 1], "templates": [0, 1, 2]},
                "static": {"first": [1, 1, 1], "em": [1, 1, 1], "templates": [0, 1, 2]}},
         "t3": {"atv": {"first": [1], "em": [1]}}}
    split = by_template([r], [t1, t2, t3], ["atv", "static"])
    own, shared = split["differences"]["atv - static"]["seen, own template"], \
        split["differences"]["atv - static"]["seen, shared template"]
    assert own["first"] == (0.0, 0.0, 0.0) and shared["first"] == (-1.0, -1.0, -1.0)
    assert own["em"][0] == 0.25                                              # t1: +1/2, t2: 0; tasks weighted equally
    assert split["means"]["atv"]["seen, own template"]["first"][0] == 1.0
    assert split["means"]["atv"]["seen, shared template"]["first"][0] == 0.0
    assert split["means"]["atv"]["unseen, own template"]["first"][0] == 1.0
    assert "static" not in [m for m in split["means"] if "unseen, own template" in split["means"][m]]
    table = by_template_table(split)
    assert "| atv - static | +0.0 [+0.0, +0.0] | -100.0 [-100.0, -100.0] | n/a |" in table
    r["t2"]["atv"]["templates"] = r["t2"]["static"]["templates"] = [1, 2, 1]   # no t2 prompt under its shared one
    fewer = by_template([r], [t1, t2, t3], ["atv", "static"])
    assert fewer["differences"]["atv - static"]["seen, shared template"]["first"] == (-1.0, -1.0, -1.0)   # t1 only
    assert fewer["means"]["static"]["seen, shared template"]["first"][0] == 1.0
    plot_by_template(split, tmp_path / "split.png")
    assert (tmp_path / "split.png").stat().st_size > 1000


def test_task_file_template_from_field_or_flag_and_without_the_suite(tmp_path, monkeypatch):
    path = tmp_path / "shout.jsonl"
    path.write_text("".join(json.dumps({"input": f"w{i}", "output": f"W{i}", "template": "Shout {input}:"}) + "\n"
                            for i in range(30)))
    assert load_task_file(path).templates == ("Shout {input}:",)
    assert load_task_file(path, templates="Loud: {input} ->").templates == ("Loud: {input} ->",)
    monkeypatch.setenv("ATV_DATA_DIR", str(tmp_path / "no-suite-here"))
    tasks = suite_and_files(Namespace(task_file=[str(path)], tasks=None, template=None))
    assert [t.name for t in tasks] == ["shout"] and tasks[0].prompt("x") == "Shout x:"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "a", "output": "b", "template": "no field"}) + "\n")
    with pytest.raises(ValueError, match="must contain {input}"):
        load_task_file(bad)


def test_static_control_trains_one_vector_per_task(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    _, vectors, _ = train(_cfg(tmp_path, static=True, gate="none", epochs=1), model, tok)
    saved = load_task_vectors(tmp_path / "run" / "task_vectors.safetensors")
    assert sorted(saved) == ["antonym", "next_number"] and saved["antonym"].shape == (3, 32)
    assert not torch.equal(saved["antonym"], saved["next_number"]) and saved["antonym"].abs().sum() > 0


def test_learned_gate_closes_on_negatives_and_examples_are_trained(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    # 6 epochs without early stopping: on a tiny random model the gate needs them to separate clearly
    # (0.91 on task vs 0.38 off task here; with 4 epochs it was 0.59 vs 0.41, too close to trust)
    cfg = _cfg(tmp_path, gate="learned", negatives=str(_negatives(tmp_path)), examples_k=3, epochs=6,
               backbone_trainable_layers=1, gate_loss_weight=5.0, negative_tokens=4, patience=None)
    train(cfg, model, tok)
    generator = load_generator(tmp_path / "run" / "generator", target=model)
    assert generator.config.gate == "learned" and generator.config.max_examples == 3
    task = load_suite(names=["antonym"])[0]
    with torch.no_grad():
        on_task = generator([task.prompt(e.input, 0) for e in task.examples("test")[:8]]).gates
        # held-out negatives as the server's chat endpoint hands them to the generator (the user text: chat_query)
        off_task = generator([chat_query([("user", f"Tell me a long story about thing {i}.")])
                              for i in range(50, 58)]).gates
    assert on_task.mean() > 0.5 > off_task.mean()


def test_negatives_are_sent_as_the_chat_endpoint_sends_them(tmp_path):
    """The target reads the chat-templated prompt (its unsteered answer is the target), the generator the user
    text, exactly what the server's chat route gives it (chat_query): training saw the template only on negatives
    before, and the gate learned the template instead of the content."""
    model, tok = make_model("llama"), make_tokenizer()
    items = negative_items(_negatives(tmp_path, 10), model, tok, "train", 3, seed=0)
    assert items and all(i.gate_label == 0.0 for i in items)
    for item in items:
        text = item.gen_input
        assert text.startswith("Tell me a long story") and "<|im_start|>" not in text
        assert item.prompt == chat_prompt(tok, text) != text and text == chat_query([("user", text)])


def test_generic_check_counts_identical_outputs(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    prompts = _negatives(tmp_path, 6)
    quiet = load_generator(make_tiny_generator_dir(tmp_path / "g0"), target=model)
    with torch.no_grad():
        quiet.expansion.up.weight.zero_()
        quiet.expansion.up.bias.zero_()
    engine = LLMEngine(model, tok, quiet, EngineConfig(max_running=8, max_waiting=100))
    result = generic_check(engine, quiet, prompts, tokens=5)
    assert result["n"] == 6 and result["identical_atv"] == 1.0 and result["identical_atv_nogate"] == 1.0
    loud = load_generator(make_tiny_generator_dir(tmp_path / "g1"), target=model)
    with torch.no_grad():
        loud.expansion.up.weight.normal_(0, 5.0)
    engine = LLMEngine(model, tok, loud, EngineConfig(max_running=8, max_waiting=100))
    assert generic_check(engine, loud, prompts, tokens=5)["identical_atv"] < 1.0


def test_run_method_scores_every_item_and_counts_target_tokens(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    generator = load_generator(make_tiny_generator_dir(tmp_path / "g", max_examples=5), target=model)
    engine = LLMEngine(model, tok, generator, EngineConfig(max_running=8, max_waiting=1000))
    tasks = load_suite(names=["antonym"])
    args = Namespace(limit=3, rotate_templates=False, k=2)
    zero = run_method(engine, "zero_shot", tasks, 0, args, generator, {})["antonym"]
    icl = run_method(engine, "icl", tasks, 0, args, generator, {})["antonym"]
    ex = run_method(engine, "atv_examples", tasks, 0, args, generator, {})["antonym"]
    assert len(zero["first"]) == len(zero["em"]) == len(zero["prompt_tokens"]) == 9
    assert ex["prompt_tokens"] == zero["prompt_tokens"]             # demonstrations never reach the target
    assert all(i > z for i, z in zip(icl["prompt_tokens"], zero["prompt_tokens"]))
    assert len(ex["gates"]) == 9 and 0 <= ex["first_token"] <= 1


def test_examples_are_evaluated_as_served_a_gate_below_gate_open_adds_no_vector(tmp_path):
    from dataclasses import replace

    from atv_core.tools.evaluate import method_prompts, test_prompts
    model = make_model("llama")
    generator = load_generator(make_tiny_generator_dir(tmp_path / "g", max_examples=5, gate="learned"), target=model)
    task = load_suite(names=["antonym"])[0]
    items = test_prompts(task, 3)
    _, vectors, _, gates = method_prompts("atv_examples", task, items, 0, 2, generator, {})
    assert all(v.abs().sum() > 0 for v in vectors) and all(0 < g < 1 for g in gates)
    cut = sorted(gates)[len(gates) // 2] + 1e-6               # closes the lower half of this seed's gates
    generator.config = replace(generator.config, gate_open=cut)
    _, vectors, _, again = method_prompts("atv_examples", task, items, 0, 2, generator, {})
    assert again == gates and [not v.any() for v in vectors] == [g < cut for g in gates]


def test_evaluate_seed_end_to_end_resumes_and_reports(tmp_path):
    from atv_core.tools.evaluate import evaluate_seed, report
    model, tok = make_model("llama"), make_tokenizer()
    train(_cfg(tmp_path, static=True, gate="none", epochs=1, tasks=("antonym", "synonym")), model, tok)
    generator_dir = make_tiny_generator_dir(tmp_path / "g", gate="distance")
    tasks = load_suite(names=["antonym", "synonym"])
    args = Namespace(out=str(tmp_path / "eval"), seeds=[0], generator=str(generator_dir), preset="default",
                     config=None, epochs=1, max_per_task=8, methods=["zero_shot", "icl", "static", "atv", "atv_examples"],
                     static_vectors=str(tmp_path / "run" / "task_vectors.safetensors"), k=2, limit=2,
                     rotate_templates=False, generic=str(_negatives(tmp_path, 4)), lora_rank=2)
    results = evaluate_seed(0, args, model, tok, tasks, {})
    assert set(results["antonym"]) == {"zero_shot", "icl", "static", "atv"}   # this generator reads no examples
    assert len(results["synonym"]["atv"]["gates"]) == 6 and results["_generic"]["n"] == 4
    methods_dir = tmp_path / "eval" / "seed0" / "methods"
    (methods_dir / "icl.json").unlink()
    (tmp_path / "eval" / "seed0" / "results.json").unlink()
    stamp = (methods_dir / "atv.json").stat().st_mtime_ns
    again = evaluate_seed(0, args, model, tok, tasks, {})           # resumes: only ICL is run again
    assert (methods_dir / "atv.json").stat().st_mtime_ns == stamp and again == results
    assert results["antonym"]["atv"]["templates"] == [0, 1, 2, 0, 1, 2]
    summary, text = report([results], tasks, args.methods, [0])
    assert "atv - static" in text and "atv - icl" in text and "generic prompts" in text
    assert summary["by_template"]["shared_templates"] == ["antonym[2]", "synonym[2]"]   # both "{input} ->"
    assert "seen, shared template" in text
    assert summary["summary"]["icl"]["mean_prompt_tokens"]["antonym"][0] > \
        summary["summary"]["atv"]["mean_prompt_tokens"]["antonym"][0]


def test_table_cells_show_std_only_over_several_seeds_and_a_dash_where_not_scored():
    from atv_core.tools.evaluate import _cell, _mean_std
    assert _cell(_mean_std([0.5]), True) == "50.0"
    assert _cell(_mean_std([0.5, 0.7]), True) == "60.0±14.1"
    assert _cell(_mean_std([]), True) == "–" and _cell(_mean_std([12.0]), False) == "12.0"
