"""The ``seed`` command: one entry point, sub-commands grouped by stage.

    seed data shapes|inspect …        data_pipelines
    seed tokenizer …                  seedtok training / eval (train_scripts, eval)
    seed llm …                        LLM training and adapters (llm_adapters, train_scripts)
    seed chat | generate | caption    the chat model (llm_adapters)
    seed eval …                       eval
    seed demo                         every stage on the embedded default

Each package contributes its sub-commands through a ``register(subparsers)`` function in its
``cli`` module, so the flags live next to the code they drive. Handlers import heavy modules
lazily, keeping ``seed --help`` fast. Errors the user can fix (:class:`seedtok.errors.SeedError`,
missing files, bad values) are printed as one ``error: …`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from seedtok.errors import SeedError


def build_parser() -> argparse.ArgumentParser:
    from data_pipelines import cli as data_cli
    from eval import cli as eval_cli
    from llm_adapters import cli as llm_cli
    from train_scripts import demo_cli, tokenizer_cli
    from train_scripts import llm_cli as train_llm_cli

    parser = argparse.ArgumentParser(
        prog="seed",
        description="SEED toolkit: image tokenizer, LLM adapters, data, training and evals.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    data_cli.register(sub)
    tokenizer_cli.register(sub)
    llm_cli.register(sub)
    train_llm_cli.register(sub)  # `seed llm train`, in the group llm_adapters created
    eval_cli.register(sub)
    demo_cli.register(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("seed-toolkit")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:  # a group given without its sub-command, e.g. `seed data`
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
        return 2
    try:
        return int(func(args) or 0)
    except SeedError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `seed … | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:  # disk full, quota, read-only file system, too many open files, …
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {_one_line(e.strerror or str(e) or type(e).__name__)}{where}", file=sys.stderr)
        return 2


def _one_line(text: str, limit: int = 1000) -> str:
    """Errors are one line: a message quoting data (a caption, a library's report) could carry
    newlines or run to pages."""
    text = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"


if __name__ == "__main__":
    sys.exit(main())
