"""Flags and helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hifi.protocols.denoiser import DenoiserBackend
from hifi.registry import load_backend


def add_backend_flags(p: argparse.ArgumentParser, default: str | None = "tiny") -> None:
    p.add_argument("--backend", default=default, help="denoiser backend (see `hifi backends`)")
    p.add_argument("--model", default=None, help="model folder or hub id for sd14 / sd14-fp16 (or HIFI_SD_MODEL)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")


def backend_from_args(args: argparse.Namespace, name: str | None = None, model: str | None = None) -> DenoiserBackend:
    """Build the backend the flags name (``name``/``model`` are fallbacks, e.g. from a run)."""
    options: dict[str, Any] = {}
    model = args.model or model
    backend = args.backend or name or "tiny"
    if model and model.startswith("random:tiny"):
        # The tiny backend's weights are its seed: "random:tiny:SEED" (as runs record it).
        options["seed"] = int(model.rsplit(":", 1)[1]) if model.count(":") == 2 else 0
    elif model:
        options["model"] = model
    if args.device:
        options["device"] = args.device
    built = load_backend(backend, **options)
    set_layout = getattr(built, "set_channels_last", None)
    if getattr(args, "accel", "eager") == "graph" and set_layout is not None and built.device.type == "cuda":
        # Graphs replay cuDNN's convolutions; channels-last spares them their transposes
        # (an H100, SD1.4 bf16: c_s step 17.1 ms vs 21.1 ms, benchmarks/results/sd14-gpu-bf16-layout.md).
        set_layout()
    return built


def warn(message: str) -> None:
    print(f"hifi: warning: {message}", file=sys.stderr)
