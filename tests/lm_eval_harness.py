"""The lm-evaluation-harness as users run it, for the integration tests: its own venv, offline, against `atv serve`.

- `harness_python()` creates (once) a venv with PyPI `lm-eval[api]` and `transformers` (the harness's
  `tokenizer_backend=huggingface` needs it; torch is not installed) and returns its python. The venv lives
  at $ATV_LM_EVAL_VENV, default <ATV cache dir>/lm-eval-venv; it is rebuilt when the pins below change.
  Measured on the 2-core dev VM: 55 s for `lm-eval[api]`, 17 s more for transformers, ~760 MB.
- `run_harness()` runs `python -m lm_eval run --model local-completions` on the task YAMLs of
  tests/lm_eval_tasks/ with HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set, and returns the results and samples.
- `start_server()` starts `atv serve` on a free port and waits for /ready.

No pytest fixtures here (the test modules own them) and nothing runs at import.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "tests" / "lm_eval_tasks"
PINS = ("lm-eval[api]==0.4.13", "transformers==5.24.0")
STAMP = ".atv-pins"


def default_venv() -> Path:
    from atv_core.models import cache_dir

    return Path(os.environ.get("ATV_LM_EVAL_VENV") or cache_dir() / "lm-eval-venv")


def harness_python(venv: Path | None = None) -> Path:
    """The python of a venv holding the pinned harness; created or re-pinned when needed (minutes)."""
    venv = Path(venv or default_venv())
    python = venv / "bin" / "python"
    stamp = venv / STAMP
    if python.exists() and stamp.exists() and stamp.read_text() == "\n".join(PINS):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS], check=True)
    stamp.write_text("\n".join(PINS))
    return python


@dataclass
class HarnessRun:
    returncode: int
    log: str
    results: dict | None                  # the harness's results JSON ("results", "configs", ...), if written
    samples: dict[str, list[dict]]        # task -> logged samples

    def metric(self, task: str, key: str) -> float:
        return self.results["results"][task][key]


def run_harness(python: Path, tasks: list[str], model_id: str, base_url: str, tokenizer_dir: str | Path,
                out_dir: Path, limit: int | None = None, timeout: float = 1800) -> HarnessRun:
    """lm_eval against the server at `base_url` (no /v1 suffix), requests as text (tokenized_requests=False)."""
    model_args = (f"model={model_id},base_url={base_url}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={tokenizer_dir},tokenized_requests=False,max_retries=1")
    cmd = [str(python), "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
           "--include_path", str(TASKS_DIR), "--tasks", ",".join(tasks), "--output_path", str(out_dir / "out"),
           "--log_samples"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(out_dir / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=out_dir, env=env, capture_output=True, text=True, timeout=timeout)
    results = sorted((out_dir / "out").rglob("results_*.json"))
    samples = {task: [json.loads(line) for f in (out_dir / "out").rglob(f"samples_{task}_*.jsonl")
                      for line in f.read_text().splitlines() if line.strip()] for task in tasks}
    return HarnessRun(proc.returncode, proc.stdout + proc.stderr,
                      json.loads(results[-1].read_text()) if results else None, samples)


@contextmanager
def start_server(args: list[str], log_path: Path, ready_timeout: float = 300):
    """`atv serve ARGS` on 127.0.0.1 and a free port; yields its base URL; stopped (SIGTERM, then SIGKILL)."""
    from tests.test_prometheus_integration import free_port, status_of, stop, tail

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATV_") or k == "ATV_CACHE_DIR"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", ATV_DRAIN_TIMEOUT="5")
    cmd = [sys.executable, "-m", "atv_core.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + ready_timeout
            while status_of(url + "/ready") != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"atv serve did not become ready (exit {proc.poll()}):\n{tail(log_path)}")
                time.sleep(0.5)
            yield url
        finally:
            stop(proc, grace=20)
