"""`build_engine()`: the one place a target, a generator and an `LLMEngine` are put together.

Used by the server, both benchmarks and the tests; evaluation builds engines around models it already
holds (a LoRA-merged target) with `LLMEngine` directly.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from atv_core.engine.llm_engine import EngineConfig, LLMEngine
from atv_core.models import generator_dir, load_target
from atv_core.steering.checkpoint import load_generator
from atv_core.steering.vectors import VectorLayout, VectorStore

log = logging.getLogger("atv.engine")


class LoadError(ValueError):
    """A part `build_engine` could not load (target, generator, vectors, engine settings), named with the
    reason: the user's to fix, so `atv serve` logs it in one line."""


@contextlib.contextmanager
def _loading(what: str):
    try:
        yield
    except (OSError, ValueError) as exc:   # missing files, bad configs, settings that cannot work
        raise LoadError(f"{what}: {exc}") from exc


def build_engine(model: str, generator: str | Path | None = "default", *, device: str = "auto",
                 dtype: str = "auto", device_map: str | None = None,
                 config: EngineConfig = EngineConfig(), vectors: str | Path | None = None,
                 chat_template: str | None = None) -> LLMEngine:
    """Load the target `model` and the `generator` checkpoint and return a ready (not started) engine.

    generator: a checkpoint folder (must load), "default" (the shipped checkpoint; none, with a warning,
    when it is missing or made for another target) or None / "none" (serve without steering).
    vectors: a folder of named vectors (steering/vectors.py), validated now against the target and the
    generator's steered layers; None = no named vectors.
    chat_template: a Jinja chat template, or a file holding one, replacing the tokenizer's (vLLM's
    --chat-template); it must render a one-message conversation.
    """
    with _loading(f"target {model!r}"):
        target, tokenizer = load_target(model, device, dtype, device_map)
    if chat_template is not None:
        with _loading("chat template " + ("(inline)" if "{" in chat_template else repr(chat_template))):
            tokenizer.chat_template = _read_template(chat_template)
            try:
                tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)
            except Exception as exc:   # jinja2's errors, or whatever the template's own code raises
                raise ValueError(f"it does not render a one-message conversation: {type(exc).__name__}: {exc}") \
                    from exc
        log.info("chat template replaced (%d characters)", len(tokenizer.chat_template))
    where = target.get_input_embeddings().weight.device
    params = sum(p.numel() for p in target.parameters()) / 1e6
    log.info("target %s loaded: %s, %.1fM parameters on %s (%s)", model, type(target).__name__, params,
             where, target.dtype)
    with _loading(f"generator {str(generator)!r}"):
        gen = _load_generator(generator, target, where, model)
    with _loading(f"vectors {str(vectors)!r}"):
        store = VectorStore(vectors, VectorLayout.for_target(target, gen, model)) if vectors is not None else None
    with _loading("engine settings"):
        return LLMEngine(target, tokenizer, gen, config, vectors=store)


def _read_template(value: str) -> str:
    """A template given inline (it has Jinja's braces), or the text of the file it names."""
    if "{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"no file {value} (give a template file, or the template text itself)")
    return path.read_text(encoding="utf-8")


def _load_generator(name: str | Path | None, target, device, model: str):
    if name is None or str(name).lower() == "none":
        log.info("generator: none (requests are served unsteered; atv.mode 'atv' is refused)")
        return None
    explicit = str(name) != "default"
    path = generator_dir(name)
    try:
        generator = load_generator(path, target=target, device=device)
    except ValueError as exc:
        if explicit:
            raise
        log.warning("no usable default generator (%s); serving without steering", exc)
        return None
    cfg = generator.config
    if Path(cfg.target).name.lower() != Path(model).name.lower():   # a path or an id of the same name is no news
        log.warning("generator %s was trained for %s, served on %s (shapes match; loading it anyway)", path,
                    cfg.target, model)
    log.info("generator %s loaded: backbone %s (%s), rank %s, %d steered layers, position %s, gate %s", path,
             cfg.backbone, str(next(generator.backbone.parameters()).dtype).removeprefix("torch."), cfg.rank,
             len(cfg.selected_layers), cfg.position, cfg.gate)
    return generator
