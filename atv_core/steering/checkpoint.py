"""Generator checkpoints: a folder with `atv_config.json` (every setting, see GeneratorConfig) and
`atv_weights.safetensors` (expansion, gate centroids, and the backbone only if it was fine-tuned).

No pickle anywhere. The backbone is re-loaded from `config.backbone` unless its weights are stored.
Loading against a target checks the target's layer count and hidden size and refuses a mismatch.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from atv_core.steering.generator import ATVGenerator, GeneratorConfig
from atv_core.models import load_backbone

CONFIG_FILE = "atv_config.json"
WEIGHTS_FILE = "atv_weights.safetensors"
FORMAT_VERSION = 1


def save_generator(generator: ATVGenerator, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "generator": generator.config.to_dict()}
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in generator.trainable_state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "atv", "version": str(FORMAT_VERSION)})
    (path / WEIGHTS_FILE).chmod((path / CONFIG_FILE).stat().st_mode & 0o777)   # safetensors writes 0600 (a
    return path                                                                 # server in a container reads it)


def read_config(path: str | Path) -> GeneratorConfig:
    """The checkpoint's settings; ValueError naming the file and the fix for anything unreadable."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.exists():
        hint = (f"; {path / 'generator'} is one (an `atv train` output folder holds the checkpoint in generator/)"
                if (path / "generator" / CONFIG_FILE).exists() else "; train one with `atv train`")
        raise ValueError(f"{path} is not an ATV generator checkpoint (no {CONFIG_FILE}){hint}")
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_file}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("generator"), dict):
        raise ValueError(f"{config_file}: expected an object with a 'generator' object (written by save_generator)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{config_file}: format_version {version!r}, but this version of atv reads "
                         f"{FORMAT_VERSION}; use the atv version that wrote it, or retrain")
    try:
        return GeneratorConfig.from_dict(meta["generator"])
    except (TypeError, ValueError) as exc:   # a missing or mistyped field
        raise ValueError(f"{config_file}: {exc}") from exc


def check_target(config: GeneratorConfig, target_layers: int, target_hidden: int) -> None:
    if (config.target_layers, config.target_hidden) != (target_layers, target_hidden):
        raise ValueError(
            f"generator was trained for a target with {config.target_layers} layers x hidden {config.target_hidden} "
            f"({config.target}), but the target has {target_layers} layers x hidden {target_hidden}; "
            "use the target it was trained for or train a generator for this one")


def load_generator(path: str | Path, target=None, device: torch.device | str = "cpu",
                   backbone=None, tokenizer=None) -> ATVGenerator:
    """Load a checkpoint folder for inference. `target` (an HF causal LM), when given, is checked for a matching
    L and d, and sets the backbone's dtype: bf16 where the target computes in bf16 (its vectors then differ from
    fp32's by ~0.3 % relative, far below what bf16 does to the target itself), else fp32. The heads (expansion,
    gate) stay fp32; pooled states are widened to fp32 before them. A `backbone` passed in is cast in place."""
    config = read_config(path)
    if target is not None:
        from atv_core.steering.layers import find_decoder_layers

        check_target(config, len(find_decoder_layers(target)), target.config.hidden_size)
    if backbone is None:
        backbone, tokenizer = load_backbone(config.backbone, device)
    generator = ATVGenerator(config, backbone, tokenizer)
    state = load_file(str(Path(path) / WEIGHTS_FILE))
    generator.centroids = torch.zeros_like(state.get("centroids", generator.centroids))
    own = generator.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("backbone.")]
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights {missing}")
    try:
        generator.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    except (KeyError, RuntimeError) as exc:   # a weight the config does not describe, or of another shape
        raise ValueError(f"checkpoint {path}: its weights do not match its {CONFIG_FILE} ({exc})") from exc
    if target is not None and target.dtype == torch.bfloat16:
        for param in generator.backbone.parameters():   # parameters only: float buffers (a RoPE's inv_freq)
            param.data = param.data.to(torch.bfloat16)   # stay fp32, as from_pretrained(dtype=bf16) keeps them
    return generator.to(device).eval()
