"""Tiny randomly initialised HF models and a byte-level tokenizer, built from configs (no downloads).

Used by the tests and by the deployment integration test: `make_tiny_model_dir(path, arch)` writes a
folder that `from_pretrained` loads like any real checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from atv_core.engine.detokenizer import bytes_to_unicode

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% if note is defined %}{{ note }}\n{% endif %}"   # a variable, for chat_template_kwargs
                 "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per UTF-8 byte, plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=SPECIALS[3:], chat_template=CHAT_TEMPLATE)


VOCAB = len(SPECIALS) + 256


def make_config(arch: str = "llama", layers: int = 3, hidden: int = 32, positions: int = 512):
    from transformers import (BertConfig, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig)

    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=512, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                max_position_embeddings=512, sliding_window=16, **common)
    if arch == "bert":
        return BertConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=512, vocab_size=VOCAB, pad_token_id=0)
    raise ValueError(f"unknown tiny arch {arch!r}")


def make_model(arch: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(arch, **kw)
    cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    model = cls.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; widen it so logits differ clearly between inputs
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


def make_tiny_model_dir(path: str | Path, arch: str = "llama", seed: int = 0, **config) -> Path:
    path = Path(path)
    make_model(arch, seed, **config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_tiny_generator_dir(path: str | Path, target_arch: str = "llama", seed: int = 0, backbone_arch: str = "bert",
                            **config) -> Path:
    """A generator checkpoint (tiny backbone, BERT by default, else a decoder of that layout; random expansion)
    that fits make_model(target_arch)."""
    from atv_core.steering.checkpoint import save_generator
    from atv_core.steering.generator import ATVGenerator, GeneratorConfig
    from atv_core.models import load_backbone

    path = Path(path)
    backbone_dir = make_tiny_model_dir(path.parent / (path.name + "-backbone"), backbone_arch, seed)
    target = make_config(target_arch)
    kind = "encoder" if backbone_arch == "bert" else "decoder"
    cfg = GeneratorConfig(backbone=str(backbone_dir), backbone_kind=kind, target=f"tiny-{target_arch}",
                          target_layers=target.num_hidden_layers, target_hidden=target.hidden_size, rank=8, **config)
    backbone, tokenizer = load_backbone(str(backbone_dir))
    generator = ATVGenerator(cfg, backbone, tokenizer)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in generator.expansion.parameters():
            p.normal_(0, 0.3)
    return save_generator(generator, path)


def record_logits(engine) -> dict[str, list]:
    """Capture each request's next-token logits row at every engine step: {request_id: [tensor, ...]}."""
    seen: dict[str, list] = {}
    original = engine._sample_and_append

    def wrapped(requests, logits):
        for r, row in zip(requests, logits):
            seen.setdefault(r.request_id, []).append(row.clone())
        return original(requests, logits)
    engine._sample_and_append = wrapped
    return seen


def kv_budget(model, blocks: int, block_size: int = 4) -> int:
    """kv_cache_bytes holding exactly `blocks` blocks of this model's KV (its layout read by the engine's probe)."""
    from atv_core.engine.attention import probe_layout, register
    register()
    return blocks * block_size * probe_layout(model).bytes_per_token


def drain(engine) -> None:
    while engine.has_work():
        engine.step()
