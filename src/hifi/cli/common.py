"""Flags and helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import sys

from hifi.protocols.denoiser import DenoiserBackend
from hifi.registry import backend_options, load_backend


def add_backend_flags(p: argparse.ArgumentParser, default: str | None = "tiny") -> None:
    p.add_argument("--backend", default=default, help="denoiser backend (see `hifi backends`)")
    p.add_argument("--model", default=None, help="model folder or hub id for sd14 / sd14-fp16 (or HIFI_SD_MODEL),"
                   " sdxl / sdxl-fp16 (HIFI_SDXL_MODEL), sd3 / sd3-fp16 (HIFI_SD3_MODEL); random:sd14, random:sdxl,"
                   " random:sd3: random weights")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")


def backend_from_args(args: argparse.Namespace, name: str | None = None, model: str | None = None) -> DenoiserBackend:
    """Build the backend the flags name (``name``/``model`` are fallbacks, e.g. from a run)."""
    backend = args.backend or name or "tiny"
    options = backend_options(args.model or model)
    if args.device:
        options["device"] = args.device
    return load_backend(backend, **options)


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"hifi: warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    """One note line on stderr (what a command did on its own, e.g. a resize)."""
    print(f"hifi: note: {message}", file=sys.stderr)
