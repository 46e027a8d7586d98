"""How long `--accel compile` takes on its first call and on the calls after it, beside eager.

Null-text inversion (Eq. 4; T steps, K updates each) of the same image, several times in one
process: eager, then through one :class:`hifi.execution.edge.Execution` in ``compile`` mode,
whose model wrapper and step runner are built once and reused by every later call (what a
run of several images or an ``eval`` does). Times are wall-clock seconds on this machine;
read them as ratios to eager measured side by side.

    python -m benchmarks.compile_warmup --name compile-warmup-cpu
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import torch

from benchmarks.report import report
from hifi import load_backend
from hifi.algorithms.null_text import NullTextConfig, null_text_inversion
from hifi.execution.edge import Execution, adam_steps
from hifi.kernels.ddim import DdimGrid


def measure(backend_name: str = "tiny", num_steps: int = 10, inner_steps: int = 10, calls: int = 3) -> dict[str, Any]:
    """Seconds of ``calls`` null-text inversions, eager and compiled (one Execution for all), in one process."""
    backend = load_backend(backend_name)
    grid = DdimGrid.build(backend.schedule, num_steps)
    config = NullTextConfig(num_steps=num_steps, inner_steps=inner_steps, tolerance=0.0)
    side = backend.resolution // backend.vae_scale_factor
    x_0 = torch.randn(1, backend.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = backend.encode_text(["a photo of a dog"])
    phi = backend.null_embedding()

    def timed(run: Any) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    eager = [timed(lambda: null_text_inversion(backend.denoise, grid, x_0, cond, phi, config, optimiser=adam_steps))
             for _ in range(calls)]
    execution = Execution("compile", backend.device)
    model = execution.model(backend.denoise)
    compiled = [timed(lambda: null_text_inversion(model, grid, x_0, cond, phi, config, optimiser=execution.runner))
                for _ in range(calls)]
    return {
        "what": f"null-text inversion, T = {num_steps}, K = {inner_steps}, backend {backend_name}, one process",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
                   f"{torch.__version__}",
        "eager_seconds": eager,
        "compile_seconds": compiled,
        "first_call_over_eager": compiled[0] / eager[0],
        "later_calls_over_eager": [c / e for c, e in zip(compiled[1:], eager[1:], strict=True)],
        "runners_made": execution.runners_made,
    }


def markdown(result: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k + 1} | {e:.2f} | {c:.2f} | {c / e:.2f} |"
                     for k, (e, c) in enumerate(zip(result["eager_seconds"], result["compile_seconds"], strict=True)))
    return (f"# `--accel compile`: the first call and the calls after it\n\n{result['what']}; {result['machine']}.\n"
            f"One `Execution` for every compiled call ({result['runners_made']} step runner made).\n\n"
            "| call | eager s | compile s | compile / eager |\n| --- | ---: | ---: | ---: |\n" + rows + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="tiny")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps T")
    p.add_argument("--inner-steps", type=int, default=10, help="K, null-text updates per step")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--name", default=None, help="write benchmarks/results/NAME.json and NAME.md")
    args = p.parse_args(argv)
    result = measure(args.backend, args.steps, args.inner_steps, args.calls)
    return report(result, markdown(result), args.name)


if __name__ == "__main__":
    raise SystemExit(main())
