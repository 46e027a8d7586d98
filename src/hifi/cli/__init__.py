"""The ``hifi`` command line: a thin layer over the public Python API.

Each sub-command lives in its own module under :mod:`hifi.cli` with a
``register(subparsers)`` function that adds its parser and sets ``func``; the handler
parses flags, calls one library function, and prints what it returns. A
:class:`~hifi.errors.HifiError` becomes one line on stderr and exit status 2, and so does a
flag argparse refuses.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from hifi import __version__
from hifi.errors import HifiError

# Sub-command modules, in the order `hifi --help` lists them.
COMMAND_MODULES = ("demo", "tune", "generate", "edit", "replace", "export", "eval", "backends", "doctor")


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser (and its sub-commands', which take its class) with an error as one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"hifi: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``hifi`` parser with every sub-command of :data:`COMMAND_MODULES`."""
    parser = OneLineParser(
        prog="hifi",
        description="HiFi Tuner: learn a subject from 3-6 photos, then draw it faithfully.",
    )
    parser.add_argument("--version", action="version", version=f"hifi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"hifi.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hifi`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except HifiError as err:
        print(f"hifi: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hifi: interrupted", file=sys.stderr)
        return 130
