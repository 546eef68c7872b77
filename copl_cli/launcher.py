"""The `copl` console script, standard library only.

The base install (`pip install copl`: the API stubs and what a client needs) has none of the command
line's dependencies. Its `copl` must not die with ModuleNotFoundError: it names what is missing and
the install that brings it, in one line, and exits 1. With the server extra it runs the command line.
"""
from __future__ import annotations

import sys
from importlib.util import find_spec

# Top-level modules of the server extra that the command line needs to start or to run any command.
SERVER_MODULES = ("typer", "sqlalchemy", "sqlmodel", "alembic", "numpy", "torch", "transformers", "peft",
                  "safetensors", "tqdm", "orjson", "matplotlib")


def missing_modules() -> list[str]:
    """The server extra's modules this environment lacks (found without importing them)."""
    return [name for name in SERVER_MODULES if find_spec(name) is None]


def main() -> None:
    missing = missing_modules()
    if missing:
        print(f"error: the copl command line needs the server extra (missing: {', '.join(missing)}); "
              "install it with: pip install 'copl[server]'", file=sys.stderr)
        sys.exit(1)
    from copl_cli.main import main as run
    run()


if __name__ == "__main__":
    main()
