"""The CPU image, built and run: the container test (marker `container`; runs in `make test`, i.e. CI).

Builds the CPU image and the Debian-package Prometheus image with scripts/build_image.sh, which starts
dockerd (installing Debian's docker.io) when no engine answers and makes a local base image from Debian
packages when no registry answers; a second run reuses docker's layer cache. Then runs the two containers
that deploy/compose.yaml describes (their environment, volumes, command and stop grace period are read
from that file) with plain `docker`, on a user-defined network where they reach each other by service
name, with a fresh cache volume, and checks: /ready, a steered and a plain completion, /metrics, a non-root
server process, the HEALTHCHECK turning healthy (short interval given at `docker run`), Prometheus (with
deploy/prometheus/ mounted) reading back a request counter this test raised, `docker stop` letting an
in-flight stream of 200 tokens finish and the server exit 0, a second container on the same volume not
converting the model again, the C++ decode kernel compiled at the first start into that volume and loaded
from it by the second, and that no layer of the final image holds the build's CA bundle, pip
configuration or wheelhouse.

Deliberate differences from compose: the ATV container gets OMP_NUM_THREADS=1 and a wider drain window
(see TEST_ENV below), so that a busy shared VM slows the stream down but does not make it miss the drain.

Does not: use the compose plugin (Debian bookworm has none; compose.yaml stays the documented way to run
the stack, and its Grafana service needs a registry), or build the CUDA target. Host ports are published
on 127.0.0.1 at free ports instead of compose's fixed 8000/9090, so that other servers on the machine
do not collide with it. Containers, network and volumes are removed afterwards; images are kept (cache).
What it measured (build, first start, restart, stop, image size) goes to build/container-test-timings.json.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
BUILD_TIMEOUT = 3600     # a cold build (base image, torch, dependencies from PyPI) on a shared 2-core VM
READY_TIMEOUT = 600      # first start converts the embedded GGUF target into the volume
HEALTHY_TIMEOUT = 120
SCRAPE_TIMEOUT = 120     # the shipped prometheus.yml scrapes every 15 s
# compose ships ATV_DRAIN_TIMEOUT=30 under a 45 s stop_grace_period; this test keeps the drain below the
# stop timeout but widens both, because a loaded shared 2-core VM decodes at a few tokens a second.
STREAM_TOKENS = 200
DRAIN_TIMEOUT_S = 240
STOP_TIMEOUT_S = 270
# One OpenMP thread: with two, each decode step's thread barriers stall behind other processes' work on a
# busy 2-core VM (measured here: 200 tokens in 474 s with 2 threads, 51 s with 1, same load).
TEST_ENV = {"ATV_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT_S), "OMP_NUM_THREADS": "1"}
PLAIN_REQUESTS = 3
CONVERSION_LOG = re.compile(r"converting .*gguf", re.IGNORECASE)
KERNEL_LOG = re.compile(r"decode attention: C\+\+ paged kernel")   # atv_core/engine/cpu_kernel.py, once loaded
MAX_IMAGE_BYTES = 2_000_000_000
TIMINGS: dict[str, float] = {}
TIMINGS_FILE = ROOT / "build" / "container-test-timings.json"  # git- and docker-ignored


# --------------------------------------------------------------------------- docker helpers

def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return proc


def logs(name: str) -> str:
    proc = docker("logs", name, check=False)
    return proc.stdout + proc.stderr


def inspect(name: str, fmt: str) -> str:
    return docker("inspect", "-f", fmt, name).stdout.strip()


def host_url(name: str, port: int) -> str:
    """http://127.0.0.1:PORT for the container port published on a free loopback port."""
    mapping = docker("port", name, f"{port}/tcp").stdout.split()[0]
    return f"http://127.0.0.1:{mapping.rsplit(':', 1)[1]}"


def run_script(cmd: list[str], log_path: Path, timeout: float) -> str:
    """Run a repo script, its output to log_path; fail with the log's tail; return stdout's last line."""
    env = {**os.environ, "PY": sys.executable}
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                              timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-40:])
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}", pytrace=False)
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------- compose -> docker run

def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME-default}, with `env` as the calling shell."""
    def sub(m: re.Match) -> str:
        return env.get(m.group(1)) or (m.group(3) or "")
    return re.sub(r"\$\{(\w+)(:?-([^}]*))?\}", sub, value)


def seconds(duration: str) -> int:
    m = re.fullmatch(r"(\d+)(s|m)", duration)
    assert m, f"unsupported duration {duration!r} in compose.yaml"
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def service_args(service: str, env: dict[str, str], volumes: dict[str, str]) -> list[str]:
    """`docker run` flags equivalent to compose's environment, volumes and stop settings of `service`.

    env: the calling shell's variables (passed-through entries without a value there are left unset);
    volumes: compose's named volumes -> this test's docker volumes.
    """
    svc = COMPOSE["services"][service]
    args = []
    for key, value in (svc.get("environment") or {}).items():
        value = env.get(key) if value is None else interpolate(str(value), env)
        if value is not None:
            args += ["-e", f"{key}={value}"]
    for spec in svc.get("volumes", []):
        src, dst, *mode = spec.split(":")
        src = str((DEPLOY / src).resolve()) if src.startswith(".") else volumes[src]
        args += ["-v", ":".join([src, dst, *mode])]
    if "stop_signal" in svc:
        args += ["--stop-signal", svc["stop_signal"]]
    return args


@dataclass
class Stack:
    """Names of this run's docker objects, and what the tests learn along the way."""
    run_id: str
    network: str = ""
    volumes: dict[str, str] = field(default_factory=dict)
    containers: list[str] = field(default_factory=list)


def start_atv(stack: Stack, image: str, name: str) -> tuple[str, float]:
    """Start the atv service as `name`; return (its URL, seconds from `docker run` to /ready 200)."""
    start = time.monotonic()
    docker("run", "-d", "--name", name, "--network", stack.network, "--network-alias", "atv",
           "-p", "127.0.0.1::8000", "-e", f"OMP_NUM_THREADS={TEST_ENV['OMP_NUM_THREADS']}",
           *service_args("atv", TEST_ENV, stack.volumes),
           "--health-interval", "2s", "--health-timeout", "5s", "--health-retries", "3",
           "--health-start-period", f"{READY_TIMEOUT}s", image)
    stack.containers.append(name)
    url = host_url(name, 8000)
    while status_of(url + "/ready") != 200:
        if inspect(name, "{{.State.Running}}") != "true":
            pytest.fail(f"container {name} exited {inspect(name, '{{.State.ExitCode}}')}:\n{logs(name)[-4000:]}")
        if time.monotonic() - start > READY_TIMEOUT:
            pytest.fail(f"{name} not ready after {READY_TIMEOUT}s:\n{logs(name)[-4000:]}")
        time.sleep(0.5)
    return url, time.monotonic() - start


# --------------------------------------------------------------------------- HTTP helpers

def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def post(url: str, body: dict, timeout: float = 120) -> dict:
    r = httpx.post(url, json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def metric(text: str, name: str, labels: str = "") -> float:
    """The sum of the samples of one series whose labels include `labels`, e.g. metric(t, "x_total", 'mode="off"')
    (request series carry more labels, such as model_name, than a test names)."""
    from prometheus_client.parser import text_string_to_metric_families

    want = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    values = [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
              if sample.name == name and want.items() <= sample.labels.items()]
    if not values:
        raise AssertionError(f"no sample {name}{{{labels}}} in /metrics")
    return sum(values)


def promql(prom: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expr})}",
                                timeout=10) as r:
        res = json.load(r)
    assert res["status"] == "success", res
    return res["data"]["result"]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """Docker engine up, CPU image and Prometheus image built; {"atv": tag, "prometheus": tag}."""
    work = tmp_path_factory.mktemp("build")
    start = time.monotonic()
    run_script(["bash", "scripts/ensure_dockerd.sh"], work / "dockerd.log", timeout=900)
    TIMINGS["docker engine up, installing it if absent (s)"] = time.monotonic() - start
    start = time.monotonic()
    atv = run_script(["bash", "scripts/build_image.sh", "atv"], work / "build-atv.log", BUILD_TIMEOUT)
    TIMINGS["build atv image, making the base if absent (s)"] = time.monotonic() - start
    start = time.monotonic()
    prometheus = run_script(["bash", "scripts/build_image.sh", "prometheus"], work / "build-prometheus.log",
                            BUILD_TIMEOUT)
    TIMINGS["build prometheus image (s)"] = time.monotonic() - start
    return {"atv": atv, "prometheus": prometheus}


@pytest.fixture(scope="module")
def stack(images):
    """A user-defined network and fresh named volumes for this run; removed (with the containers) after."""
    s = Stack(run_id=f"atv-test-{os.getpid()}-{int(time.time())}")
    s.network = s.run_id
    docker("network", "create", s.network)
    for name in COMPOSE.get("volumes", {}):
        s.volumes[name] = f"{s.run_id}-{name}"
        docker("volume", "create", s.volumes[name])
    yield s
    for name in reversed(s.containers):
        docker("rm", "-f", "-v", name, check=False, timeout=120)
    docker("network", "rm", s.network, check=False)
    for vol in s.volumes.values():
        docker("volume", "rm", "-f", vol, check=False)
    timings = json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}, indent=1)
    TIMINGS_FILE.parent.mkdir(exist_ok=True)
    TIMINGS_FILE.write_text(timings + "\n")
    print(f"\ncontainer test timings ({TIMINGS_FILE}): {timings}")


@pytest.fixture(scope="module")
def atv(stack, images) -> str:
    """The atv service running (first start on the fresh cache volume); its URL."""
    name = f"{stack.run_id}-atv"
    url, ready_s = start_atv(stack, images["atv"], name)
    TIMINGS["first start to /ready, with conversion (s)"] = ready_s
    return url


@pytest.fixture(scope="module")
def prometheus(stack, images, atv) -> str:
    """The prometheus service, deploy/prometheus/ mounted as compose does, scraping atv:8000; its URL."""
    name = f"{stack.run_id}-prometheus"
    svc = COMPOSE["services"]["prometheus"]
    docker("run", "-d", "--name", name, "--network", stack.network, "--network-alias", "prometheus",
           "-p", "127.0.0.1::9090", *service_args("prometheus", {}, stack.volumes),
           images["prometheus"], *svc.get("command", []))
    stack.containers.append(name)
    url = host_url(name, 9090)
    deadline = time.monotonic() + 60
    while status_of(url + "/-/ready") != 200:
        if inspect(name, "{{.State.Running}}") != "true" or time.monotonic() > deadline:
            pytest.fail(f"prometheus not ready:\n{logs(name)[-4000:]}")
        time.sleep(0.5)
    return url


@dataclass
class StopOutcome:
    status: int
    chunks_before_stop: int
    texts: list[str]
    finish_reasons: list[str]
    usage: dict | None
    done: bool
    stop_s: float
    exit_code: int
    logs: str


def stream_until_done(url: str, body: dict, out: dict, started: threading.Event) -> None:
    """Read an SSE completion stream into out; set `started` after the first few chunks."""
    try:
        with httpx.stream("POST", url, json=body, timeout=300) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    out["done"] = True
                    continue
                chunk = json.loads(data)
                out["chunks"].append(chunk)
                if len(out["chunks"]) >= 5:
                    started.set()
    except Exception as e:  # reported by the test through out["error"]
        out["error"] = repr(e)
    finally:
        started.set()


@pytest.fixture(scope="module")
def drained_stop(stack, atv) -> StopOutcome:
    """`docker stop` while a 200-token stream is in flight; what happened."""
    name = f"{stack.run_id}-atv"
    grace = STOP_TIMEOUT_S
    assert DRAIN_TIMEOUT_S < grace
    compose_atv = COMPOSE["services"]["atv"]
    assert int(interpolate(compose_atv["environment"]["ATV_DRAIN_TIMEOUT"], {})) < seconds(
        compose_atv["stop_grace_period"]), "compose.yaml: ATV_DRAIN_TIMEOUT must stay below stop_grace_period"
    body = {"prompt": "Write a long story about a lighthouse keeper.", "max_tokens": STREAM_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "atv": {"mode": "atv"}}
    out: dict = {"chunks": [], "done": False, "status": 0}
    started = threading.Event()
    reader = threading.Thread(target=stream_until_done, args=(atv + "/v1/completions", body, out, started))
    reader.start()
    assert started.wait(120), "the stream did not start"
    chunks_before_stop = len(out["chunks"])
    start = time.monotonic()
    docker("stop", "-t", str(grace), name, timeout=grace + 60)
    stop_s = time.monotonic() - start
    reader.join(60)
    assert "error" not in out, out.get("error")
    choices = [c for ch in out["chunks"] for c in ch.get("choices", [])]
    usage = next((ch["usage"] for ch in out["chunks"] if ch.get("usage")), None)
    TIMINGS["docker stop with a stream in flight (s)"] = stop_s
    return StopOutcome(status=out["status"], chunks_before_stop=chunks_before_stop,
                       texts=[c.get("text", "") for c in choices],
                       finish_reasons=[c["finish_reason"] for c in choices if c.get("finish_reason")],
                       usage=usage, done=out["done"], stop_s=stop_s,
                       exit_code=int(inspect(name, "{{.State.ExitCode}}")), logs=logs(name))


# --------------------------------------------------------------------------- the image

def history(image: str) -> str:
    return docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout


def diff_ids(image: str) -> list[str]:
    return json.loads(inspect(image, "{{json .RootFS.Layers}}"))


class HashingReader:
    """A read-only stream that hashes what passes through it (a layer's diff ID is the sha256 of its tar)."""

    def __init__(self, raw):
        self.raw, self.sha = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        return data

    def digest(self) -> str:
        while self.read(1 << 20):
            pass
        return "sha256:" + self.sha.hexdigest()


def pem_lines(bundle: bytes) -> set[bytes]:
    """One line from the middle of each certificate in a PEM bundle: enough to recognise it anywhere."""
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----\s+(.*?)-----END CERTIFICATE-----", bundle, re.S)
    return {b.split()[len(b.split()) // 2] for b in blocks}


def build_certificates(base: str) -> tuple[bytes, set[bytes]]:
    """The CA bundle the build used and its certificates that the base image does not carry itself."""
    path = DEPLOY / "build-inputs" / "pip" / "ca-certificates.crt"
    bundle = path.read_bytes() if path.exists() else b""
    in_base = docker("run", "--rm", "--entrypoint", "cat", base, "/etc/ssl/certs/ca-certificates.crt",
                     check=False).stdout.encode()
    return bundle, pem_lines(bundle) - pem_lines(in_base)


def suspicious(entry: tarfile.TarInfo, layer: tarfile.TarFile, bundle: bytes, certs: set[bytes]) -> list[str]:
    """Why a file of an image layer looks like a build input (empty when it does not)."""
    path, found = entry.name, []
    base = path.rsplit("/", 1)[-1]
    if "build-inputs" in path or "wheelhouse" in path or base in ("pip.conf", "pip.ini") or base.endswith(".whl"):
        found.append(f"{path}: build input by name")
    if entry.isfile() and entry.size <= 4 << 20 and (certs or bundle):
        data = layer.extractfile(entry).read()
        if bundle and data == bundle:
            found.append(f"{path}: the build's CA bundle")
        found += [f"{path}: holds a build CA certificate" for c in certs if c in data]
    return found


def scan_saved_image(image: str, skip: set[str], bundle: bytes, certs: set[bytes]) -> list[str]:
    """Stream `docker save image`; findings in every layer whose diff ID is not in skip (the base's)."""
    proc = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    findings, layers_seen = [], 0
    with tarfile.open(fileobj=proc.stdout, mode="r|") as saved:
        for member in saved:
            if not member.isfile() or not (member.name.endswith("layer.tar") or member.name.startswith("blobs/")):
                continue
            reader = HashingReader(saved.extractfile(member))
            layer_findings = []
            try:
                with tarfile.open(fileobj=reader, mode="r|") as layer:
                    for entry in layer:
                        layer_findings += suspicious(entry, layer, bundle, certs)
            except tarfile.ReadError:  # an OCI blob that is JSON, not a layer
                continue
            layers_seen += 1
            if reader.digest() not in skip:
                findings += layer_findings
    assert proc.wait(timeout=600) == 0, "docker save failed"
    assert layers_seen >= len(diff_ids(image)), f"read {layers_seen} layers of {image}"
    return findings


# --------------------------------------------------------------------------- tests

def test_image_is_under_2gb_and_runs_as_non_root(images):
    size = int(inspect(images["atv"], "{{.Size}}"))
    TIMINGS["image size (MB)"] = size / 1e6
    assert size < MAX_IMAGE_BYTES, f"{images['atv']} is {size / 1e9:.2f} GB"
    user = inspect(images["atv"], "{{.Config.User}}")
    assert user and user.split(":")[0] not in ("", "0", "root"), user
    healthcheck = json.loads(inspect(images["atv"], "{{json .Config.Healthcheck.Test}}"))
    assert healthcheck == ["CMD", "python", "-m", "server.healthcheck"], healthcheck   # GET /health on its port


def test_final_image_holds_no_build_inputs(images):
    image = images["atv"]
    for needle in ("build-inputs", "PIP_CONFIG_FILE", "PIP_CERT", "wheelhouse", "TORCH_FROM"):
        assert needle not in history(image), f"`docker history {image}` mentions {needle}"
    # The build stage does hold them: the scan below can tell.
    assert "build-inputs" in history("atv-build:cpu")
    base_layers = diff_ids(image)[:len(diff_ids(base_image(image)))]
    bundle, certs = build_certificates(base_image(image))
    findings = scan_saved_image(image, set(base_layers), bundle, certs)
    assert not findings, "\n".join(findings[:50])


def base_image(image: str) -> str:
    """The base the image was built from: the image whose layers start the final image's layers."""
    layers = diff_ids(image)
    for candidate in ("atv-base:bookworm", "python:3.11-slim-bookworm", os.environ.get("BASE_IMAGE", "")):
        if candidate and docker("image", "inspect", candidate, check=False).returncode == 0:
            base = diff_ids(candidate)
            if layers[:len(base)] == base:
                return candidate
    pytest.fail(f"cannot tell which base image {image} was built from")


def test_ready_and_models(atv):
    assert status_of(atv + "/ready") == 200
    assert status_of(atv + "/health") == 200
    models = httpx.get(atv + "/v1/models", timeout=30).json()
    assert models["data"] and models["data"][0]["has_generator"] is True, models


def test_server_process_is_not_root(stack, atv):
    status = docker("exec", f"{stack.run_id}-atv", "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    assert set(uids) == {"10001"}, status
    assert "atv" in docker("exec", f"{stack.run_id}-atv", "cat", "/proc/1/cmdline").stdout


def test_steered_and_plain_completions(atv):
    prompt = "Review: A gorgeous, moving film with superb acting.\nSentiment:"
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    steered = post(atv + "/v1/completions", {**body, "atv": {"mode": "atv", "scale": 1.0}})
    plain = post(atv + "/v1/completions", {**body, "atv": {"mode": "off"}})
    assert steered["atv"]["mode"] == "atv" and steered["atv"]["vector_norm"] > 0, steered
    assert plain["atv"]["mode"] == "off", plain
    for res in (steered, plain):
        assert res["usage"]["completion_tokens"] == 4, res
        assert res["choices"][0]["text"], res


def test_metrics(atv):
    text = httpx.get(atv + "/metrics", timeout=30).text
    assert metric(text, "atv_engine_up") == 1
    assert metric(text, "atv_requests_steering_total", 'mode="atv"') >= 1
    assert metric(text, "atv_generation_tokens_total") > 0


def test_healthcheck_turns_healthy(stack, atv):
    name = f"{stack.run_id}-atv"
    deadline = time.monotonic() + HEALTHY_TIMEOUT
    while (state := inspect(name, "{{.State.Health.Status}}")) != "healthy":
        assert state in ("starting", "healthy"), (state, inspect(name, "{{json .State.Health}}"))
        assert time.monotonic() < deadline, f"still {state}: {inspect(name, '{{json .State.Health}}')}"
        time.sleep(1)
    last = json.loads(inspect(name, "{{json .State.Health.Log}}"))[-1]
    assert last["ExitCode"] == 0, last


def test_prometheus_reads_back_a_counter_raised_here(atv, prometheus):
    before = metric(httpx.get(atv + "/metrics", timeout=30).text, "atv_requests_steering_total", 'mode="off"')
    for i in range(PLAIN_REQUESTS):
        post(atv + "/v1/completions", {"prompt": f"Count to {i}:", "max_tokens": 1, "atv": {"mode": "off"}})
    expected = before + PLAIN_REQUESTS
    assert metric(httpx.get(atv + "/metrics", timeout=30).text, "atv_requests_steering_total",
                  'mode="off"') == expected
    expr = 'sum(atv_requests_steering_total{job="atv", mode="off"})'
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    while True:
        result = promql(prometheus, expr)
        if result and float(result[0]["value"][1]) == expected:
            break
        assert time.monotonic() < deadline, f"{expr} = {result}, expected {expected}"
        time.sleep(1)
    (up,) = promql(prometheus, 'up{job="atv"}')
    assert up["metric"]["instance"] == "atv:8000" and up["value"][1] == "1", up


def test_stop_finishes_the_in_flight_stream_and_exits_0(drained_stop):
    out = drained_stop
    assert out.status == 200
    assert out.chunks_before_stop < STREAM_TOKENS, "the stream had finished before docker stop"
    assert out.usage and out.usage["completion_tokens"] == STREAM_TOKENS, out.usage
    assert "".join(out.texts).strip(), "the stream carried no text"
    assert out.finish_reasons == ["length"], out.finish_reasons
    assert out.done, "no [DONE] after the drain"
    assert out.exit_code == 0, out.logs[-3000:]
    assert out.stop_s < STOP_TIMEOUT_S, out.stop_s


def test_restart_on_the_same_volume_skips_the_conversion(stack, images, drained_stop):
    assert CONVERSION_LOG.search(drained_stop.logs), "the first start on a fresh volume did not convert"
    name = f"{stack.run_id}-atv-restarted"
    url, ready_s = start_atv(stack, images["atv"], name)
    TIMINGS["restart to /ready, same volume (s)"] = ready_s
    assert not CONVERSION_LOG.search(logs(name)), logs(name)[-3000:]
    res = post(url + "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "ignore_eos": True})
    assert res["usage"]["completion_tokens"] == 2


def test_the_decode_kernel_is_compiled_into_the_cache_volume(stack, images, drained_stop):
    """The image carries a compiler (CPU_KERNEL=1): the first start builds the C++ decode kernel for this CPU into
    /cache/torch_extensions, and the restart on the same volume serves with it too."""
    restarted = f"{stack.run_id}-atv-restarted"
    if restarted not in stack.containers:
        pytest.skip("needs the restart test's container")
    for text in (drained_stop.logs, logs(restarted)):
        assert KERNEL_LOG.search(text), text[-3000:]
    # torch builds into $TORCH_EXTENSIONS_DIR/<name>/<name>.so; loaded, not rebuilt: older than the restart
    found = docker("exec", restarted, "sh", "-c", "stat -c %Y /cache/torch_extensions/atv_paged_decode_*/"
                   "atv_paged_decode_*.so", check=False)
    assert found.returncode == 0 and found.stdout.strip(), f"no built kernel in the cache volume: {found.stderr}"
    started = datetime.datetime.fromisoformat(inspect(restarted, "{{.State.StartedAt}}")[:26].rstrip("Z") + "+00:00")
    assert max(map(int, found.stdout.split())) < started.timestamp(), "the restart rebuilt the kernel"
