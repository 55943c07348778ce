"""The C++ decode-attention kernel for CPU (csrc/paged_decode.cpp), compiled on first use.

The torch path in attention.py copies every decode's keys and values out of the paged pools each layer
(one index_select per pool) before two batched matmuls; the kernel reads them in place through the slots
instead, like vLLM's CPU paged-attention kernels. Measured on the 2-core VM (32 decodes of ~160 keys, 9
query / 3 K/V heads of 64, fp32): 0.55-0.57 ms per layer against 0.77-0.87 ms for the torch path. It also
takes bf16 pools and queries (arithmetic in fp32, the output rounded once): on a CPU with AMX, bf16 decode steps
of the default target were ~12 % shorter than with the torch path's gather + SDPA.

It is built with torch.utils.cpp_extension (g++ and ninja, -O3 -march=native) into torch's extension
cache (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR), once per source and CPU: ~25 s the first
time, then loaded from the cache. Where it cannot be built (no compiler, no Python headers, read-only
cache) `load()` says why in the log and returns None, and the engine keeps the torch path; ATV_CPU_KERNEL=0
turns it off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("atv.engine")
SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
DTYPES = (torch.float32, torch.bfloat16)   # what the kernel computes (its q and pools share one of them)
STALE_LOCK_S = 600                    # a build lock older than this was left by a process killed mid-build


def _cpu_fingerprint() -> str:
    """A short hash of the CPU's model and flags: a -march=native build is only loaded on a matching CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return hashlib.sha1("".join(lines).encode()).hexdigest()[:10]


@lru_cache(maxsize=1)
def load():
    """The compiled module (with `decode_attention`), or None where it cannot be built (logged once)."""
    if os.environ.get("ATV_CPU_KERNEL", "1") == "0":
        log.info("decode attention: torch path (ATV_CPU_KERNEL=0)")
        return None
    compiler = os.environ.get("CXX", "c++")           # what torch.utils.cpp_extension compiles with
    if shutil.which(compiler) is None:
        log.warning("decode attention: torch path; no C++ compiler to build the kernel (%r not on PATH)", compiler)
        return None
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension
        if shutil.which("ninja") is None:           # torch runs `ninja` from PATH: use the pip package's binary
            import ninja                             # (a dependency) when the environment is not activated
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        name = f"atv_paged_decode_{_cpu_fingerprint()}"
        _remove_stale_lock(Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock")
        module = cpp_extension.load(name, [str(SOURCE)],
                                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                    verbose=False)
    except Exception as error:                       # no compiler / ninja / headers: keep the torch path
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        log.warning("decode attention: torch path; the C++ kernel could not be built (%s)", reason[:300])
        return None
    log.info("decode attention: C++ paged kernel (%s, ready in %.1f s)", SOURCE.name, time.perf_counter() - start)
    return module


def _remove_stale_lock(lock: Path) -> None:
    """torch waits, without a timeout, for the build lock of another process to go away; a process killed
    while building (a server stopped during its first start) leaves it behind. A lock older than
    STALE_LOCK_S (a build takes ~25 s) is removed instead of hanging every later start."""
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return                                       # no lock: nobody is building
    if age > STALE_LOCK_S:
        log.warning("removing a stale C++ kernel build lock (%s, %.0f s old)", lock, age)
        lock.unlink(missing_ok=True)
