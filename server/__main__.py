"""`python -m server [flags]`: the same as `atv serve [flags]`."""
import sys

from .app import cli

if __name__ == "__main__":
    sys.exit(cli())
