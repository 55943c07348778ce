"""The `atv` command: serve, train, eval, vectors build|list, bench engine|serve|prefix. Parses the command, hands off."""
from __future__ import annotations

import argparse
import importlib
import os
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
# what a user can get wrong (a task file, a folder, a setting): one line, not a traceback
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words in (2, 1):
        command = " ".join(argv[:words])
        if len(argv) >= words and command in COMMANDS:
            module, func = COMMANDS[command].split(":")
            try:
                return int(getattr(importlib.import_module(module), func)(argv[words:]) or 0)
            except USER_ERRORS as exc:
                if os.environ.get("ATV_TRACEBACK"):   # where it came from, when it may be a bug rather than a mistake
                    raise
                print(f"atv {command}: error: {exc} (ATV_TRACEBACK=1 shows where)", file=sys.stderr)
                return 2
    groups = sorted({c.split()[0] for c in COMMANDS if " " in c})
    parser = argparse.ArgumentParser(prog="atv", description="Adaptive Task Vector serving")
    if argv[:1] and argv[0] in groups:   # `atv vectors`, `atv bench --help`: the group's subcommands
        parser.prog = f"atv {argv[0]}"
        parser.add_argument("subcommand", choices=sorted(c.split()[1] for c in COMMANDS if c.startswith(argv[0] + " ")))
        parser.parse_args(argv[1:2])
        return 2
    parser.add_argument("command", choices=sorted({c.split()[0] for c in COMMANDS}))
    parser.parse_args(argv[:1])
    return 2


if __name__ == "__main__":
    sys.exit(main())
