"""Training and evaluation plumbing on tiny models (the real recipe runs in `atv train` / `atv eval`)."""
import json
from dataclasses import replace

import pytest
import torch


from atv_core.steering.checkpoint import load_generator
from atv_core.tools.evaluate import first_content_token, icl_prefix, normalise, run_engine, score
from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.tools.tasks import load_suite
from atv_core.tools.train import TrainConfig, encode, sequence_slots, train
from tests.tiny import make_model, make_tiny_model_dir, make_tokenizer


def _cfg(tmp_path, **kw):
    backbone = make_tiny_model_dir(tmp_path / "bert", "bert")
    base = dict(target="tiny", backbone=str(backbone), tasks=("antonym", "next_number"), max_per_task=12, epochs=2,
                batch_size=4, lr=5e-3, device="cpu", out=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


def test_encode_masks_everything_but_the_answer():
    tok = make_tokenizer()
    batch = encode(tok, ["ab", "abcd"], [" x\n", " yz\n"], "cpu")
    assert batch["prompt_lens"] == [2, 4] and batch["total_lens"] == [5, 8]
    labels = batch["labels"]
    assert (labels[0, :2] == -100).all() and (labels[0, 5:] == -100).all() and (labels[0, 2:5] != -100).all()
    slots = sequence_slots(batch["prompt_lens"], batch["total_lens"], "last", 8)
    assert slots[0].tolist() == [0, 1, 1, 1, 1, 0, 0, 0] and slots[1].tolist() == [0, 0, 0, 2, 2, 2, 2, 2]


def test_train_lowers_loss_writes_a_loadable_checkpoint_and_resumes(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    cfg = _cfg(tmp_path)
    generator, shared, history = train(cfg, model, tok)
    assert shared is None and len(history) == 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    loaded = load_generator(run / "generator", target=model)
    assert loaded.config.recipe["epochs"] == 2 and loaded.centroids.shape[0] == 2 * 3   # tasks x templates
    assert loaded.config.gate == "distance" and loaded.config.gate_threshold < 1
    _, _, more = train(replace(cfg, epochs=3), model, tok)       # resumes after epoch 2
    assert [h["epoch"] for h in more] == [3]


def test_bank_recipe_trains_and_eval_config_overrides_the_preset(tmp_path):
    """--bank-size K --rank 0: only the bank and its router learn (here with the consistency regulariser on);
    `atv eval --config` carries the same fields."""
    from argparse import Namespace
    from atv_core.tools.evaluate import recipe
    model, tok = make_model("llama"), make_tokenizer()
    generator, _, history = train(_cfg(tmp_path, bank_size=4, rank=0, epochs=1, consistency_weight=1.0), model, tok)
    assert generator.expansion.up is None and generator.expansion.bank.abs().sum() > 0
    assert load_generator(tmp_path / "run" / "generator", target=model).config.bank_size == 4
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"bank_size": 8, "rank": 0, "layers": [0, 1]}))
    cfg = recipe(Namespace(preset="strong", config=str(config)))
    assert (cfg.bank_size, cfg.rank, cfg.layers, cfg.gate) == (8, 0, (0, 1), "learned")
    config.write_text(json.dumps({"bank": 8}))
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['bank'\]"):
        recipe(Namespace(preset="strong", config=str(config)))


def test_bank_init_starts_the_bank_at_a_static_runs_task_vectors(tmp_path):
    from atv_core.tools.train import build_generator, init_bank
    model, tok = make_model("llama"), make_tokenizer()
    train(_cfg(tmp_path, static=True, gate="none", epochs=1), model, tok)        # antonym, next_number
    static = tmp_path / "run" / "task_vectors.safetensors"
    generator = build_generator(_cfg(tmp_path, bank_size=2), model, "cpu")
    init_bank(generator, str(static), ["next_number", "antonym"])
    from atv_core.tools.train import load_task_vectors
    saved = load_task_vectors(static)
    assert torch.equal(generator.expansion.bank[0].view(3, 32), saved["next_number"])
    with pytest.raises(ValueError, match=r"no vector for the trained tasks \['synonym'\]"):
        init_bank(generator, str(static), ["antonym", "synonym"])
    with pytest.raises(ValueError, match=r"bank_size = the number of trained tasks \(1\), got 2"):
        init_bank(generator, str(static), ["antonym"])
    # through train(): bank_size follows the task count, and the bank moved on from its start
    generator, _, _ = train(_cfg(tmp_path, bank_init=str(static), epochs=1, out=str(tmp_path / "b")), model, tok)
    assert generator.config.bank_size == 2 and generator.config.recipe["bank_init"] == str(static)
    assert not torch.equal(generator.expansion.bank[0].view(3, 32), saved["antonym"])


def test_task_consistency_pulls_vectors_toward_their_task_mean_and_ignores_negatives():
    from atv_core.tools.train import Item, TaskConsistency
    items = [Item("p", "t", "a"), Item("p", "t", "a"), Item("p", "t", "b"), Item("p", "t", "neg", gate_label=0.0)]
    reg = TaskConsistency(2.0)
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0], [50.0, 50.0]]).view(4, 1, 2)
    assert reg(items, same).item() == 0.0                           # each task at its mean; the negative is ignored
    assert torch.equal(reg.means["a"], torch.tensor([[1.0, 0.0]])) and "neg" not in reg.means
    spread = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0], [0.0, 0.0]], requires_grad=True)
    loss = reg(items, spread.view(4, 1, 2))                          # task a: |(1,0)|^2 and |(-1,0)|^2; b: 0
    torch.testing.assert_close(loss, torch.tensor(2.0 * (1 + 1 + 0) / 3))
    loss.backward()
    assert spread.grad[3].abs().sum() == 0 and spread.grad[0, 0] > 0 and spread.grad[1, 0] < 0
    torch.testing.assert_close(reg.means["a"], torch.tensor([[1.0, 0.0]]))   # running mean: 0.9 (1,0) + 0.1 (1,0)


def test_shared_vector_control_trains_one_vector(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    _, shared, _ = train(_cfg(tmp_path, shared=True, epochs=1), model, tok)
    assert shared.v.shape == (3, 32) and shared.v.abs().sum() > 0
    assert (tmp_path / "run" / "shared_vector.safetensors").exists()


def test_icl_demos_are_balanced_and_scoring_uses_the_first_content_token():
    task = next(t for t in load_suite() if t.name == "sentiment_rt")
    demos = icl_prefix(task, 4, 0)
    assert sorted(d.output for d in demos) == ["negative", "negative", "positive", "positive"]
    tok = make_tokenizer()
    assert first_content_token(tok, " 48") == "4"
    assert normalise(" Paris.\nmore") == "paris"


def test_engine_scoring_end_to_end_on_a_tiny_model():
    model, tok = make_model("llama"), make_tokenizer()
    engine = LLMEngine(model, tok, None, EngineConfig(max_running=4, max_waiting=100))
    requests = run_engine(engine, ["a", "bb", "ccc"], None, "off", 3)
    assert all(len(r.output_ids) <= 3 and r.finished for r in requests)
    first, em = score(tok, requests, [tok.decode(r.output_ids).strip() or "x" for r in requests])
    assert 0 <= first <= 1 and 0 <= em <= 1


def test_lora_baseline_trains_and_merges(tmp_path):
    from atv_core.tools.evaluate import train_lora
    model, tok = make_model("llama"), make_tokenizer()
    cfg = _cfg(tmp_path, epochs=1)
    merged, n_params = train_lora(cfg, model, tok, 4, tmp_path)
    assert n_params > 0 and type(merged).__name__ == "LlamaForCausalLM"
    ids = torch.randint(5, 200, (1, 6))
    assert not torch.equal(merged(ids).logits, model(ids).logits)     # trained and merged into a copy
    assert not any("lora" in name for name, _ in merged.named_parameters())
