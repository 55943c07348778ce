"""The container's HEALTHCHECK: `python -m server.healthcheck` exits 0 when GET /health answers 200.

The port is the one `atv serve` listens on: its --port flag (the image's entrypoint is `atv serve`, so
`docker run atv:cpu --port 9000` passes it there), else ATV_PORT, else 8000. Standard library only.
"""
from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path


def serve_port(cmdline: list[str], environ: dict[str, str]) -> str:
    """The port of `atv serve` started with `cmdline` (flags beat the environment, as in server/settings.py)."""
    if "serve" in cmdline:
        for i, arg in enumerate(cmdline):
            if arg == "--port" and i + 1 < len(cmdline):
                return cmdline[i + 1]
            if arg.startswith("--port="):
                return arg.split("=", 1)[1]
    return environ.get("ATV_PORT", "8000")


def main() -> int:
    try:   # the container's first process is the server
        cmdline = Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        cmdline = []
    url = f"http://127.0.0.1:{serve_port(cmdline, dict(os.environ))}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:   # refused, timed out, or an HTTP error status (503: the engine died)
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
