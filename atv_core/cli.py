"""The `atv` command: serve, train, eval, bench. Parses arguments and hands off; no logic lives here."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "serve": "server.app:cli",
        "train": "atv_core.train:cli",
        "eval": "atv_core.evaluate:cli",
        "bench": "atv_core.bench:cli",
    }
    if not argv or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog="atv", description="Adaptive Task Vector serving")
        parser.add_argument("command", choices=sorted(commands))
        parser.parse_args(argv[:1])
        return 2
    module, func = commands[argv[0]].split(":")
    return int(getattr(__import__(module, fromlist=[func]), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
