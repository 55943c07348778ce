"""Find the list of decoder blocks of any Hugging Face causal LM.

One function, `find_decoder_layers`, used by the injection hooks, the engine and training. It knows the
common layouts and accepts an explicit dotted path for anything else. It does not modify the model.
"""
from __future__ import annotations

from torch import nn

# Dotted attribute paths, tried in order. Covers Llama/Mistral/Qwen2/Gemma/Phi/SmolLM (model.layers),
# GPT-2/GPT-J/Bloom (transformer.h), GPT-NeoX/Pythia (gpt_neox.layers), OPT (model.decoder.layers),
# Falcon/MPT (transformer.h / transformer.blocks) and multimodal wrappers (model.language_model.layers).
KNOWN_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "model.decoder.layers",
    "transformer.h",
    "transformer.blocks",
    "transformer.layers",
    "gpt_neox.layers",
    "layers",
    "h",
)


def _resolve(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """Return the decoder-block list of `model`.

    `path` (or the attribute `model.atv_layers_path`) overrides the search, e.g. "backbone.blocks".
    """
    path = path or getattr(model, "atv_layers_path", None)
    candidates = (path,) if path else KNOWN_LAYER_PATHS
    for candidate in candidates:
        found = _resolve(model, candidate)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    if path:
        raise ValueError(f"layers path {path!r} does not name a non-empty nn.ModuleList on {type(model).__name__}")
    raise ValueError(
        f"could not find the decoder layers of {type(model).__name__} (tried {', '.join(KNOWN_LAYER_PATHS)}). "
        "Pass layers_path='dotted.path.to.ModuleList' (or set model.atv_layers_path) to name them."
    )
