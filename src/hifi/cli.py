"""The ``hifi`` command line: a thin layer over the public Python API.

Each sub-command parses its flags, calls one library function, and prints what it
returns. A :class:`~hifi.errors.HifiError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from hifi import __version__
from hifi.errors import HifiError
from hifi.registry import available_backends

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Command] = {}


def _cmd_backends(args: argparse.Namespace) -> int:
    for name, source in available_backends().items():
        print(f"{name:12s} {source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hifi",
        description="HiFi Tuner: learn a subject from 3-6 photos, then draw it faithfully.",
    )
    parser.add_argument("--version", action="version", version=f"hifi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("backends", help="list the registered denoiser backends")
    p.set_defaults(func=_cmd_backends)
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


if __name__ == "__main__":
    sys.exit(main())
