"""Oversized input is refused at the door, nothing heavy runs on the event loop, and each tokenizer has one thread.

In-process servers (uvicorn on a thread, tiny random models) for the unit-sized checks; the acceptance test
runs a real `atv serve` subprocess (tiny model; and, marked slow, the embedded SmolLM2 default) and floods it
with 20 MB bodies (with and without Content-Length) and prompts just under the character pre-check bound while
/health is polled and a stream runs.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from atv_core.engine.async_engine import AsyncEngine
from atv_core.engine.build import build_engine
from atv_core.engine.llm_engine import EngineConfig
from tests.test_server import (assert_error, async_engine, eventually, free_port, make_settings, metric, scrape,
                               serving, sse_events)
from tests.tiny import make_tiny_generator_dir, make_tiny_model_dir, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024




@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits-assets")
    return make_tiny_model_dir(root / "model"), make_tiny_generator_dir(root / "gen")


@pytest.fixture(scope="module")
def served(assets):
    with serving(async_engine(assets[0], None), make_settings(max_body_bytes=MB)) as s:
        yield s


# ---- raw HTTP -----------------------------------------------------------------------------------
def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def raw_post(port: int, chunks, *, length: int | None, pace_s: float = 0.0, timeout: float = 10.0) -> dict:
    """POST /v1/completions over a socket, sending `chunks` on a thread (chunked when length is None) while the
    response is read. Returns status, JSON body, seconds to the response, and body bytes sent by then."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
                 .encode())
    sent, stop = [0], threading.Event()

    def send_body():
        with contextlib.suppress(OSError):  # the server may close once it answered
            for chunk in chunks:
                if stop.is_set():
                    return
                sock.sendall(chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent[0] += len(chunk)
                time.sleep(pace_s)
            if length is None:
                sock.sendall(b"0\r\n\r\n")

    start = time.monotonic()
    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    try:
        status, body = read_response(sock)
        elapsed, sent_then = time.monotonic() - start, sent[0]
    finally:
        stop.set()
        sock.close()
        sender.join(5)
    return {"status": status, "body": body, "seconds": elapsed, "sent": sent_then}


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers["content-length"])
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(rest[:length])


PIECE = b"x" * (256 * 1024)


def big_body(size: int):
    """A JSON completion body of `size` bytes, in 256 KiB pieces (one shared object: cheap for the client)."""
    head, tail = b'{"prompt": "', b'"}'
    yield head
    left = size - len(head) - len(tail)
    while left > 0:
        yield PIECE if left >= len(PIECE) else PIECE[:left]
        left -= len(PIECE)
    yield tail


# ---- the body limit -----------------------------------------------------------------------------
def test_declared_oversized_body_is_refused_before_it_is_sent(served):
    result = raw_post(port_of(served), iter(()), length=20 * MB)   # announces 20 MB, sends none of it
    assert result["status"] == 413 and result["body"]["error"]["code"] == "body_too_large"
    assert set(result["body"]["error"]) == {"message", "type", "param", "code"}
    assert result["seconds"] < 1.0


def test_chunked_oversized_body_is_refused_as_soon_as_it_passes_the_limit(served):
    # 20 MB at 256 KiB per 10 ms would take ~1 s to send: the answer comes after ~1 MB
    result = raw_post(port_of(served), big_body(20 * MB), length=None, pace_s=0.01)
    assert result["status"] == 413 and result["body"]["error"]["code"] == "body_too_large"
    assert result["sent"] < 4 * MB, result["sent"]
    assert httpx.get(served.url + "/health").status_code == 200


def test_body_under_the_limit_reaches_the_route(served):
    result = raw_post(port_of(served), [json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()], length=None)
    assert result["status"] == 200 and result["body"]["choices"]
    body = b"".join(big_body(MB - 100))
    response = httpx.post(served.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert assert_error(response, 413, "prompt")["code"] == "context_length_exceeded"  # the prompt check


def test_body_limit_counts_in_http_metrics(served):
    before = metric(scrape(served.url), "atv_http_requests_total", status="413")
    raw_post(port_of(served), iter(()), length=5 * MB)
    assert metric(scrape(served.url), "atv_http_requests_total", status="413") == before + 1


# ---- the character pre-check --------------------------------------------------------------------
def test_character_bound_never_refuses_a_prompt_that_fits(served):
    limits = served.engine.limits
    longest = max(("<|im_start|>", "<|im_end|>", "<pad>"), key=len)  # the tiny vocabulary's longest entry
    assert limits.max_prompt_chars == limits.max_model_len * (len(longest) + 1)
    densest = longest * (limits.max_model_len - 5)    # as many characters as a prompt that fits can have
    response = served.post("/v1/completions", {"prompt": densest, "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == limits.max_model_len - 5
    over = served.post("/v1/completions", {"prompt": "x" * (limits.max_prompt_chars + 1)})
    error = assert_error(over, 413, "prompt")
    assert "characters" in error["message"] and error["code"] == "context_length_exceeded"
    chat = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (limits.max_prompt_chars + 1)}]})
    assert_error(chat, 413, "messages")


# ---- one thread per tokenizer -------------------------------------------------------------------
class RecordingTokenizer:
    """Forwards everything to a tokenizer and notes the thread of every use."""

    def __init__(self, inner):
        self._inner = inner
        self.threads: set[str] = set()

    def _note(self) -> None:
        self.threads.add(threading.current_thread().name)

    def __getattr__(self, name):
        self._note()
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        self._note()
        return self._inner(*args, **kwargs)

    def __len__(self) -> int:
        self._note()
        return len(self._inner)

    def __deepcopy__(self, memo):
        return RecordingTokenizer(copy.deepcopy(self._inner, memo))


def test_each_tokenizer_is_used_by_one_thread_under_concurrent_load(assets):
    engine = build_engine(str(assets[0]), assets[1], device="cpu", config=EngineConfig(max_running=4, max_waiting=64))
    engine.tokenizer = RecordingTokenizer(engine.tokenizer)
    async_engine = AsyncEngine(engine)           # the worker's tokenizer: a deep copy, recording too
    worker_tokenizer = async_engine._tokens._tokenizer
    assert isinstance(worker_tokenizer, RecordingTokenizer) and worker_tokenizer is not engine.tokenizer
    with serving(async_engine, make_settings()) as s:
        engine.tokenizer.threads.clear()         # construction happened on this thread, before any serving
        worker_tokenizer.threads.clear()

        def load(i: int) -> int:
            stop = {"stop": ["a", "é"]} if i % 2 else {}
            with httpx.stream("POST", s.url + "/v1/completions", timeout=60, json={
                    "prompt": f"Hello number {i} ü 世", "max_tokens": 12, "stream": True, "logprobs": 2, **stop}) as r:
                events = sse_events(r)
            chat = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": f"Hi {i} 😀"}],
                                                   "max_tokens": 8, "logprobs": True, "top_logprobs": 2})
            plain = s.post("/v1/completions", {"prompt": ["a", "bb"], "n": 2, "max_tokens": 6, "atv": {"mode": "off"}})
            return len(events) + chat.status_code + plain.status_code

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(load, range(16)))
        assert all(r > 400 for r in results)
    assert engine.tokenizer.threads == {"atv-engine"}
    assert len(worker_tokenizer.threads) == 1 and next(iter(worker_tokenizer.threads)).startswith("atv-tokenizer")


# ---- admission ----------------------------------------------------------------------------------
def test_a_flood_gets_200_or_429_never_an_error(assets):
    engine = async_engine(assets[0], None, max_running=1, max_waiting=2)
    engine.engine.step_listeners.append(lambda stats: time.sleep(0.005))
    with serving(engine, make_settings()) as s:
        before = scrape(s.url)

        def one(i: int) -> int:
            return s.post("/v1/completions", {"prompt": f"p{i}", "max_tokens": 3, "ignore_eos": True}).status_code

        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(one, range(60)))
        after = scrape(s.url)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    errors = metric(after, "atv_requests_finished_total", finish_reason="error")
    assert errors == metric(before, "atv_requests_finished_total", finish_reason="error")


# ---- acceptance: a real `atv serve` under a flood of big input ----------------------------------
@contextlib.contextmanager
def atv_serve(tmp_path: Path, *args: str):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATV_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "atv_core.cli", "serve", "--device", "cpu", "--port", str(port),
                                 *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: _ready(url) or proc.poll() is not None, timeout=180, interval=0.2)
        assert proc.poll() is None, log_path.read_text()
        yield url, port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Poller:
    """GET /health every 50 ms on a thread, noting each answer's latency."""

    def __init__(self, url: str):
        self.url, self.latencies, self.failures = url, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    status = client.get(self.url + "/health").status_code
                except httpx.HTTPError as exc:
                    status = repr(exc)
                (self.latencies if status == 200 else self.failures).append(time.monotonic() - start)
                time.sleep(0.05)

    def __enter__(self) -> "Poller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


class Stream:
    """A long greedy stream on a thread, noting when each event arrives."""

    def __init__(self, url: str):
        self.url, self.arrivals = url, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True,
                "temperature": 0}
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.arrivals.append(time.monotonic())
                if self._stop.is_set():
                    return

    def __enter__(self) -> "Stream":
        self._thread.start()
        eventually(lambda: len(self.arrivals) >= 3, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def gaps_between(self, start: float, end: float) -> list[float]:
        times = [t for t in self.arrivals if start <= t <= end]
        return [b - a for a, b in zip(times, times[1:])]


def httpx_post(url: str, content) -> dict:
    start = time.monotonic()
    response = httpx.post(url + "/v1/completions", content=content, timeout=60,
                          headers={"content-type": "application/json"})
    return {"status": response.status_code, "body": response.json(), "seconds": time.monotonic() - start}


def flood(url: str, port: int, prompt_chars: int) -> list[tuple[str, dict]]:
    """4 x 20 MB with Content-Length, 4 x 20 MB chunked (2 each by raw socket, 2 by httpx), 4 prompts of
    `prompt_chars` characters, all at once."""
    size = 20 * MB
    whole = b"".join(big_body(size))
    prompt = json.dumps({"prompt": ("hello world " * (prompt_chars // 12 + 1))[:prompt_chars]}).encode()
    jobs = [("length", lambda: raw_post(port, big_body(size), length=size)),
            ("length", lambda: httpx_post(url, whole)),
            ("chunked", lambda: raw_post(port, big_body(size), length=None)),
            ("chunked", lambda: httpx_post(url, big_body(size)))] * 2
    jobs += [("prompt", lambda: httpx_post(url, prompt))] * 4
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [(kind, pool.submit(job)) for kind, job in jobs]
        return [(kind, future.result()) for kind, future in futures]


@pytest.fixture
def client_gil_switching():
    """The flood's clients share this process's GIL: switch it as often as `atv serve` does (server/app.py)."""
    from server.app import GIL_SWITCH_INTERVAL_S

    interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.integration
@pytest.mark.usefixtures("client_gil_switching")
@pytest.mark.parametrize("which", ["tiny", pytest.param("embedded", marks=pytest.mark.slow)])
def test_big_input_is_refused_while_health_and_streams_stay_responsive(which, assets, tmp_path):
    from atv_core.engine.tokenization import longest_token_chars
    from atv_core.models import EMBEDDED_TARGET, load_tokenizer

    if which == "tiny":   # a context as long as the embedded target's (rotary positions: any length computes)
        model = str(make_tiny_model_dir(tmp_path / "model", positions=8192))
        args = ["--generator", str(assets[1]), "--max-model-len", "8192"]
        tokenizer = make_tokenizer()
    else:
        model, args = EMBEDDED_TARGET, ["--generator", "default"]
        tokenizer = load_tokenizer(EMBEDDED_TARGET)
    with atv_serve(tmp_path, "--model", model, "--max-tokens", "8000", *args) as (url, port):
        max_model_len = httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"]
        bound = max_model_len * (longest_token_chars(tokenizer) + 1)
        greedy = {"prompt": "Hello", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(url + "/v1/completions", json=greedy, timeout=60).json()["choices"][0]["text"]
        with Poller(url) as health, Stream(url) as stream:
            start = time.monotonic()
            results = flood(url, port, bound - 16)
            end = time.monotonic()
            time.sleep(0.3)
        for kind, result in results:
            if kind == "prompt":  # tokenized on the worker, then too many tokens for the context
                assert result["status"] == 413 and result["body"]["error"]["code"] == "context_length_exceeded"
            else:
                assert result["status"] == 413 and result["body"]["error"]["code"] == "body_too_large", result
                assert result["seconds"] < 1.0, [(k, round(r["seconds"], 2), r.get("sent")) for k, r in results]
        assert not health.failures and len(health.latencies) >= 5
        assert max(health.latencies) < 1.0, sorted(health.latencies)[-5:]
        gaps = stream.gaps_between(start, end)
        assert gaps and max(gaps) < 1.0, (end - start, sorted(gaps)[-5:])
        assert httpx.post(url + "/v1/completions", json=greedy, timeout=60).json()["choices"][0]["text"] == answer
