"""End to end: a real Prometheus scrapes a running ATV server and its atv_ series read back.

The Prometheus configuration is derived from the shipped deploy/prometheus/prometheus.yml (same job
and rule files, scrape interval shortened, target rewritten to the test server), so a broken job,
metric name or alert expression shows up here. Needs Debian's `prometheus` binary
(`apt-get install prometheus`; scripts/validate_deploy.sh installs it) and a tiny model built by
tests/tiny.py. Everything binds to 127.0.0.1 on free ports.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
SERVER_READY_TIMEOUT = 60
SCRAPE_TIMEOUT = 45

# Series a server exports once it has answered a few completions (generator "none").
REQUIRED_SERIES = {
    "atv_engine_up", "atv_num_requests_running", "atv_num_requests_waiting", "atv_vector_slots_used",
    "atv_prompt_tokens_total", "atv_generation_tokens_total", "atv_requests_finished_total",
    "atv_http_requests_total",
    "atv_e2e_request_latency_seconds_bucket", "atv_e2e_request_latency_seconds_count",
    "atv_time_to_first_token_seconds_bucket", "atv_request_queue_time_seconds_bucket",
    "atv_batch_size_bucket", "atv_step_duration_seconds_bucket",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


def status_of(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def tail(path: Path, n: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


@pytest.fixture(scope="module")
def atv_server(tmp_path_factory):
    """A running server on a tiny random model; yields its base URL."""
    try:
        from tests.tiny import make_tiny_model_dir
    except ImportError:
        sys.path.insert(0, str(ROOT))
        from tests.tiny import make_tiny_model_dir

    work = tmp_path_factory.mktemp("atv-server")
    model_dir = make_tiny_model_dir(work / "model")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATV_")}  # no stray API key, limits...
    env.update(ATV_CACHE_DIR=str(work / "cache"), HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", ATV_DEVICE="cpu", ATV_DRAIN_TIMEOUT="5", PYTHONUNBUFFERED="1",
               ATV_VLLM_METRICS="1")   # the vllm: series too (the atv_ ones are unchanged by it)
    cmd = [sys.executable, "-m", "atv_core.cli", "serve", "--model", str(model_dir), "--generator", "none",
           "--host", "127.0.0.1", "--port", str(port)]
    log_path = work / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + SERVER_READY_TIMEOUT
            while status_of(url + "/ready") != 200:
                if proc.poll() is not None:
                    pytest.fail(f"server exited with {proc.returncode}:\n{tail(log_path)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"server not ready after {SERVER_READY_TIMEOUT}s:\n{tail(log_path)}")
                time.sleep(0.25)
            yield url
        finally:
            stop(proc, grace=20)


def derived_config(target: str) -> dict:
    """The shipped prometheus.yml, reduced to the atv job, scraping `target` every second."""
    shipped = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg = copy.deepcopy(shipped)
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str((PROM_DIR / rf).resolve()) for rf in shipped.get("rule_files", [])]
    cfg.pop("alerting", None)
    (job,) = [j for j in shipped["scrape_configs"] if j["job_name"] == "atv"]
    job = copy.deepcopy(job)
    job.update(scrape_interval="1s", scrape_timeout="1s")
    for sc in job["static_configs"]:
        sc["targets"] = [target]
    cfg["scrape_configs"] = [job]
    return cfg


@pytest.fixture(scope="module")
def prometheus(atv_server, tmp_path_factory):
    """Prometheus scraping the test server; yields its base URL."""
    binary = shutil.which("prometheus")
    if not binary:
        pytest.fail("prometheus not found; install it: apt-get install prometheus "
                    "(scripts/validate_deploy.sh does it)", pytrace=False)
    work = tmp_path_factory.mktemp("prometheus")
    cfg_path = work / "prometheus.yml"
    cfg_path.write_text(yaml.safe_dump(derived_config(urllib.parse.urlsplit(atv_server).netloc)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work / "prometheus.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg_path}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while status_of(url + "/-/ready") != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"prometheus did not become ready:\n{tail(log_path)}")
                time.sleep(0.2)
            yield url
        finally:
            stop(proc, grace=15)


def query(prom: str, expr: str) -> list[dict]:
    code, res = http_json(f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert code == 200 and res.get("status") == "success", f"{expr}: {res}"
    return res["data"]["result"]


def wait_for(prom: str, expr: str, pred=lambda r: bool(r), timeout: float = SCRAPE_TIMEOUT) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        result = query(prom, expr)
        if pred(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"no satisfying result for {expr!r} within {timeout}s; last: {result}")
        time.sleep(0.5)


def value(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def traffic(atv_server):
    """A few completions so that counters and histograms have samples."""
    code, models = http_json(atv_server + "/v1/models")
    assert code == 200, models
    model = models["data"][0]["id"]
    for i in range(3):
        code, body = http_json(atv_server + "/v1/completions",
                               {"model": model, "prompt": f"hello {i}", "max_tokens": 4, "temperature": 0})
        assert code == 200, body
    return model


def test_prometheus_scrapes_the_server(prometheus):
    result = wait_for(prometheus, 'up{job="atv"}', lambda r: r and value(r) == 1)
    assert result[0]["metric"]["job"] == "atv"
    assert value(wait_for(prometheus, 'atv_engine_up{job="atv"}')) == 1


def test_atv_series_read_back(prometheus, traffic):
    wait_for(prometheus, 'sum(atv_generation_tokens_total{job="atv"}) > 0')
    # all series present after one more scrape
    names = {r["metric"]["__name__"]
             for r in wait_for(prometheus, 'count by (__name__) ({__name__=~"atv_.+", job="atv"})',
                               lambda r: REQUIRED_SERIES <= {x["metric"]["__name__"] for x in r})}
    assert REQUIRED_SERIES <= names
    assert value(query(prometheus, 'sum(atv_prompt_tokens_total{job="atv"})')) > 0
    finished = query(prometheus, 'sum by (finish_reason) (atv_requests_finished_total{job="atv"})')
    reasons = {r["metric"].get("finish_reason") for r in finished if float(r["value"][1]) > 0}
    assert reasons and reasons <= {"stop", "length", "abort", "error"}, finished
    statuses = {r["metric"].get("status") for r in query(prometheus, 'atv_http_requests_total{job="atv"}')}
    assert "200" in statuses, statuses


def test_vllm_named_series_read_back_with_model_name(prometheus, traffic):
    """ATV_VLLM_METRICS=1: what vLLM dashboards, alerts and KEDA triggers query, labelled with the model id."""
    for expr in ('vllm:time_to_first_token_seconds_count{job="atv"}', 'vllm:e2e_request_latency_seconds_count{job="atv"}',
                 'vllm:num_requests_waiting{job="atv"}'):
        result = wait_for(prometheus, expr)
        assert {r["metric"].get("model_name") for r in result} >= {traffic}, result
    ttft = wait_for(prometheus, f'sum(vllm:time_to_first_token_seconds_count{{job="atv", model_name="{traffic}"}}) >= 3')
    assert value(ttft) >= 3
    success = query(prometheus, f'sum(vllm:request_success_total{{job="atv", model_name="{traffic}"}})')
    assert value(success) >= 3
    for name in ("vllm:inter_token_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:num_requests_running", "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert query(prometheus, f'{name}{{job="atv", model_name="{traffic}"}}'), name


def test_dashboard_and_autoscaler_queries_return_data(prometheus, traffic):
    wait_for(prometheus, 'sum(atv_e2e_request_latency_seconds_count{job="atv"}) >= 3')
    # the dashboard's latency panel expression (with $__rate_interval/$instance filled in)
    dash = json.loads((ROOT / "deploy/grafana/dashboards/atv.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    ttft = next(e for e in exprs if e.startswith("histogram_quantile(0.95")
                and "atv_time_to_first_token_seconds_bucket" in e)
    ttft = ttft.replace("$__rate_interval", "5m").replace("$instance", ".*")
    p95 = value(wait_for(prometheus, ttft))
    assert p95 > 0
    # the KEDA trigger's query (selects on job="atv", as the ServiceMonitor labels it)
    so = yaml.safe_load((ROOT / "deploy/k8s/base/scaledobject.yaml").read_text())
    waiting = next(t["metadata"]["query"] for t in so["spec"]["triggers"] if "waiting" in t["metadata"]["query"])
    assert value(wait_for(prometheus, waiting)) >= 0


def test_alert_rules_load_and_evaluate(prometheus, traffic):
    def healthy(groups):
        rules = [r for g in groups for r in g["rules"]]
        return rules and all(r.get("health") == "ok" for r in rules)

    deadline = time.monotonic() + SCRAPE_TIMEOUT
    while True:
        code, res = http_json(prometheus + "/api/v1/rules")
        assert code == 200, res
        groups = res["data"]["groups"]
        if healthy(groups):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"rules not all healthy: {json.dumps(groups)[:2000]}")
        time.sleep(0.5)
    names = {r["name"] for g in groups for r in g["rules"]}
    assert {"ATVEngineDown", "ATVQueueGrowing", "ATVTimeToFirstTokenP95OverBudget", "ATVHigh5xxRate"} <= names
    # a healthy idle server fires none of them
    firing = [r["name"] for g in groups for r in g["rules"] if r.get("state") == "firing"]
    assert not firing, firing
