"""Where the time of a guided image and of a null-text inversion goes: UNet, Adam, copies, the rest.

Runs Algorithm 2's loop and null-text inversion once each under ``torch.profiler`` (CPU, and
CUDA when the backend is there), after one warm-up, and splits the device time (CUDA) or
the CPU time of the operators into shares by kind: the denoiser's work (convolutions,
matrix products, attention, normalisation, activations), Adam's update, copies, and every
other operator; the wall time not covered by operators is Python and launch overhead.

    python -m benchmarks.profile_loops --backend tiny --name profile-tiny-cpu
    python -m benchmarks.profile_loops --arch sd14 --sample-size 64 --dtype bf16 --steps 50 --name profile-sd14-gpu
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.batching import stages
from benchmarks.report import report
from hifi import load_backend
from hifi.protocols.denoiser import DenoiserBackend

KINDS = {
    "denoiser": ("conv", "addmm", "mm", "bmm", "matmul", "linear", "attention", "softmax", "group_norm",
                 "layer_norm", "native_layer_norm", "silu", "gelu", "baddbmm", "_efficient", "_flash", "cudnn"),
    "adam": ("adam", "_foreach", "lerp", "addcdiv", "addcmul"),
    "copies": ("copy_", "to_copy", "_to_copy", "clone", "contiguous", "cat"),
}


def kind(name: str) -> str:
    lowered = name.lower()
    for label, needles in KINDS.items():
        if any(n in lowered for n in needles):
            return label
    return "other operators"


def profile_stage(backend: DenoiserBackend, fn: Callable[[], Any]) -> dict[str, Any]:
    cuda = backend.device.type == "cuda"
    fn()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(backend.device)
    wall = time.perf_counter() - start
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("ProfilerStep") or event.key.startswith("cuda"):
            continue
        own = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6
        shares[kind(event.key)] = shares.get(kind(event.key), 0.0) + own
    busy = sum(shares.values())
    return {"wall_seconds": wall, "operator_seconds": busy, "shares": {k: v / wall for k, v in shares.items()},
            "python_and_launch": max(0.0, 1.0 - busy / wall) if not cuda else None,
            "device_idle": max(0.0, 1.0 - busy / wall) if cuda else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="tiny")
    p.add_argument("--arch", default=None, help="sd14 or sd21: the architecture with random weights")
    p.add_argument("--sample-size", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--phi-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--accel", default="eager", choices=["eager", "compile", "graph"])
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.arch:
        from hifi_backends.stable_diffusion import build_random_architecture

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        backend: DenoiserBackend = build_random_architecture(args.arch, sample_size=args.sample_size, dtype=dtype)
    else:
        backend = load_backend(args.backend)
    chosen = stages(backend, args.batch, args.steps, args.phi_steps, args.accel)
    rows = {stage: profile_stage(backend, fn) for stage, fn in chosen.items() if not stage.startswith("plain")}
    result = {"what": f"{args.arch or args.backend}, batch {args.batch}, T = {args.steps}, J = K = {args.phi_steps},"
                      f" accel {args.accel}, {backend.device}", "rows": rows}
    lines = [f"# Profile: {result['what']}", "",
             "Shares of the wall time by operator kind (device time on CUDA, CPU time on the CPU).", "",
             "| stage | wall s | denoiser | adam | copies | other operators | not in operators |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for stage, r in rows.items():
        s = r["shares"]
        rest = r["python_and_launch"] if r["python_and_launch"] is not None else r["device_idle"]
        lines.append(f"| {stage} | {r['wall_seconds']:.3f} | {s.get('denoiser', 0):.0%} | {s.get('adam', 0):.0%} |"
                     f" {s.get('copies', 0):.0%} | {s.get('other operators', 0):.0%} | {rest:.0%} |")
    return report(result, "\n".join(lines) + "\n", args.name)


if __name__ == "__main__":
    raise SystemExit(main())
