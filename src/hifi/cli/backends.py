"""``hifi backends``: list the registered denoiser backends."""

from __future__ import annotations

import argparse
from typing import Any

from hifi.registry import available_backends


def run(args: argparse.Namespace) -> int:
    for name, source in available_backends().items():
        print(f"{name:12s} {source}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("backends", help="list the registered denoiser backends")
    p.set_defaults(func=run)
