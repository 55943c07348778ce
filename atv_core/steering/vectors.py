"""Named steering vectors: a folder of saved task vectors that requests select by name (`atv.vector`).

One vector is two files in the folder:
- `<name>.safetensors`: exactly one tensor, named "vector", of shape [L_sel, d]: one row per *steered*
  layer of the target, in the same units as a generated vector (the checkpoint's lambda already applied;
  the engine adds `scale * vector_weight * row` to each steered layer's output).
  L_sel is the layers the engine steers: the generator's selected layers when the server has a generator,
  all decoder layers when it has none. A vector must match them exactly (a [L, d] vector does not fit a
  server whose generator steers a subset, and is refused rather than silently truncated).
- `<name>.json`: metadata: `target` (model id), `target_layers` (L), `hidden_size` (d), `layers` (the
  steered layer indices, length L_sel), `position` (the position policy it was built under: the generator's,
  "all" without one), `built_from` (how it was made), `created` (UTC), `norm`.

Loading validates every file against the serving target (`VectorLayout`): shape, layers, finite values;
errors name the file and the expected shape. Files are read with safetensors only (never unpickled).
`VectorStore.reload()` re-reads the whole folder and swaps the set in one assignment: a bad file raises
and leaves the previous set in place. Reads (`get`, `names`) are safe from any thread during a reload.

This module does not build vectors (tools/vectors.py) and does not apply them (engine/llm_engine.py).
"""
from __future__ import annotations

import json
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from atv_core.steering.layers import find_decoder_layers

log = logging.getLogger("atv.vectors")

TENSOR_KEY = "vector"
FORMAT_VERSION = 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")   # usable in a model id `<base>:vector/<name>`


@dataclass(frozen=True)
class VectorLayout:
    """Where a named vector's rows go on the serving target: L decoder layers, the steered ones, hidden d."""
    target_layers: int
    layers: tuple[int, ...]
    hidden_size: int
    target: str | None = None          # model id, informational (a mismatch is logged, not refused)
    position: str | None = None        # the position policy the rows are added under (the generator's; "all"
                                       # without one); informational like `target`

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.layers), self.hidden_size)

    @classmethod
    def for_target(cls, model, generator=None, target: str | None = None) -> "VectorLayout":
        """The layout an engine around `model` (and `generator`, if any) steers."""
        n_layers = len(find_decoder_layers(model))
        layers = generator.config.selected_layers if generator is not None else range(n_layers)
        position = generator.config.position if generator is not None else "all"
        return cls(n_layers, tuple(layers), model.config.hidden_size, target, position)

    def describe(self) -> str:
        return (f"[{self.shape[0]}, {self.shape[1]}] (layers {_span(self.layers)} of a {self.target_layers}-layer "
                f"target, hidden {self.hidden_size})")


@dataclass(frozen=True)
class NamedVector:
    name: str
    vector: torch.Tensor               # [L_sel, d] float32, on the CPU
    meta: dict = field(default_factory=dict)

    @property
    def norm(self) -> float:
        return float(self.vector.norm())


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"vector name {name!r} is not usable: use 1-100 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (no '/' or ':')")
    return name


def read_vector(tensor_path: Path, layout: VectorLayout | None = None) -> NamedVector:
    """Read and validate `<name>.safetensors` and its `<name>.json`. Raises ValueError naming the file."""
    tensor_path = Path(tensor_path)
    name = check_name(tensor_path.stem)
    meta = _read_meta(tensor_path.with_suffix(".json"))
    vector = _read_tensor(tensor_path)
    declared = (len(meta["layers"]), int(meta["hidden_size"]))
    if tuple(vector.shape) != declared:
        raise ValueError(f"{tensor_path}: tensor shape {list(vector.shape)} disagrees with its metadata "
                         f"(layers {_span(meta['layers'])}, hidden {meta['hidden_size']}: expected {list(declared)})")
    if layout is not None:
        _check_layout(tensor_path, vector, meta, layout)
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{tensor_path}: the vector holds NaN or infinite values; rebuild it")
    return NamedVector(name, vector, meta)


def _read_tensor(path: Path) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc}); rebuild it with `atv vectors build`") \
            from exc
    if list(tensors) != [TENSOR_KEY]:
        raise ValueError(f"{path}: expected exactly one tensor named {TENSOR_KEY!r}, found {sorted(tensors)}")
    vector = tensors[TENSOR_KEY]
    if vector.dim() != 2 or not vector.is_floating_point():
        raise ValueError(f"{path}: expected a 2-D float tensor [layers, hidden], got {vector.dtype} "
                         f"{list(vector.shape)}")
    return vector.float().contiguous()


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} is missing: every named vector needs its metadata file next to it "
                         "(`atv vectors build` writes both)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("target_layers", "hidden_size", "layers") if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}; `atv vectors build` writes them")
    layers = meta["layers"]
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers) or not layers:
        raise ValueError(f"{path}: 'layers' must be a non-empty list of layer indices, got {layers!r}")
    return meta


def _check_layout(path: Path, vector: torch.Tensor, meta: dict, layout: VectorLayout) -> None:
    if tuple(vector.shape) != layout.shape or tuple(meta["layers"]) != layout.layers \
            or int(meta["target_layers"]) != layout.target_layers:
        raise ValueError(f"{path}: shape {list(vector.shape)} (layers {_span(meta['layers'])} of a "
                         f"{meta['target_layers']}-layer target) does not fit this server: expected "
                         f"{layout.describe()}; rebuild it for this target and generator")
    if layout.target and meta.get("target") and meta["target"] != layout.target:
        log.warning("%s was built for %s, served on %s (shapes match; loading it anyway)", path, meta["target"],
                    layout.target)
    if layout.position and meta.get("position") and meta["position"] != layout.position:
        log.warning("%s was built under position policy %r; this server adds vectors under %r, so it steers "
                    "other positions than it was made for (loading it anyway; rebuild it for this server's "
                    "generator, or serve it with one of policy %r)", path, meta["position"], layout.position,
                    meta["position"])


def read_folder(folder: Path, layout: VectorLayout | None) -> dict[str, NamedVector]:
    """Every `<name>.safetensors` + `<name>.json` pair in `folder` (hidden files ignored), validated."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"vectors folder {folder} does not exist; create it or build a vector into it with "
                         "`atv vectors build --out DIR`")
    tensors = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    orphans = sorted({p.stem for p in folder.glob("*.json") if not p.name.startswith(".")} - {p.stem for p in tensors})
    if orphans:
        raise ValueError(f"{folder / (orphans[0] + '.json')} has no {orphans[0]}.safetensors next to it; "
                         "remove it or add the vector")
    return {p.stem: read_vector(p, layout) for p in tensors}


class VectorStore:
    """The named vectors a server offers: loaded from one folder, validated against one layout."""

    def __init__(self, folder: str | Path, layout: VectorLayout):
        self.folder, self.layout = Path(folder), layout
        self._lock = threading.Lock()           # serialises reloads; readers take the current dict as is
        self._vectors: dict[str, NamedVector] = {}
        self.reload()

    def reload(self) -> list[str]:
        """Re-read the folder; on any bad file raise (naming it) and keep the previous set. -> names."""
        with self._lock:
            vectors = read_folder(self.folder, self.layout)
            self._vectors = vectors               # one reference swap: readers see the old or the new set
        log.info("named vectors from %s: %s", self.folder, ", ".join(vectors) or "(none)")
        return list(vectors)

    def get(self, name: str) -> NamedVector | None:
        return self._vectors.get(name)

    def names(self) -> list[str]:
        return list(self._vectors)

    def __contains__(self, name: str) -> bool:
        return name in self._vectors

    def __len__(self) -> int:
        return len(self._vectors)


def _span(layers: Sequence[int]) -> str:
    """(0, 1, ..., 29) -> '0..29'; anything not contiguous is listed."""
    layers = list(layers)
    if layers and layers == list(range(layers[0], layers[0] + len(layers))):
        return f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


def vector_metadata(name: str, vector: torch.Tensor, layout: VectorLayout, built_from: dict) -> dict:
    """The `<name>.json` contents for a vector [L_sel, d] made for `layout`."""
    import datetime

    norm = float(vector.norm())
    if not math.isfinite(norm):
        raise ValueError(f"vector {name!r} holds NaN or infinite values; not saved")
    return {"format_version": FORMAT_VERSION, "name": name, "target": layout.target,
            "target_layers": layout.target_layers, "hidden_size": layout.hidden_size, "layers": list(layout.layers),
            "position": layout.position, "built_from": built_from, "norm": norm,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_vector(folder: str | Path, name: str, vector: torch.Tensor, layout: VectorLayout,
                 built_from: dict) -> Path:
    """Save `vector` [L_sel, d] as `<folder>/<name>.safetensors` + `.json` (temp files, then renames)."""
    from safetensors.torch import save_file

    check_name(name)
    if tuple(vector.shape) != layout.shape:
        raise ValueError(f"vector {name!r} has shape {list(vector.shape)}; expected {layout.describe()}")
    meta = vector_metadata(name, vector, layout, built_from)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensor_tmp, meta_tmp = folder / f".{name}.safetensors.tmp", folder / f".{name}.json.tmp"
    save_file({TENSOR_KEY: vector.detach().to("cpu", torch.float32).contiguous()}, str(tensor_tmp),
              metadata={"format": "atv-vector", "version": str(FORMAT_VERSION)})
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tensor_tmp.chmod(meta_tmp.stat().st_mode & 0o777)   # safetensors writes 0600: as readable as the JSON (umask)
    tensor_tmp.replace(folder / f"{name}.safetensors")
    meta_tmp.replace(folder / f"{name}.json")
    return folder / f"{name}.safetensors"
