"""The `atv` command: serve, train, eval, vectors build|list, bench engine|serve|prefix. Parses the command, hands off."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "serve": "server.app:cli",
    "train": "atv_core.tools.train:cli",
    "eval": "atv_core.tools.evaluate:cli",
    "vectors build": "atv_core.tools.vectors:build_cli",
    "vectors list": "atv_core.tools.vectors:list_cli",
    "bench engine": "atv_core.tools.bench:cli",
    "bench serve": "atv_core.tools.bench_serve:cli",
    "bench prefix": "atv_core.tools.bench_prefix:cli",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words in (2, 1):
        command = " ".join(argv[:words])
        if len(argv) >= words and command in COMMANDS:
            module, func = COMMANDS[command].split(":")
            return int(getattr(importlib.import_module(module), func)(argv[words:]) or 0)
    parser = argparse.ArgumentParser(prog="atv", description="Adaptive Task Vector serving")
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.parse_args(argv[:1])
    return 2


if __name__ == "__main__":
    sys.exit(main())
