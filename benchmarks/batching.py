"""Many images at once: images per second of plain generation, Algorithm 2 and null-text inversion at batch B.

Each stage runs at batch 1, 4 and 8 (``--batches``) in one process, side by side, and is
reported as images per second and as a ratio to batch 1 (a ratio above 1: the batch pays
for itself), with the peak memory of each (the GPU's peak allocation on CUDA; on the CPU
the process's peak resident set so far, which only grows). The stages are the shipped
loops (``hifi.algorithms``) on synthetic inputs: ``generate`` (Eq. 7, guided both branches),
``reference_guided_sample`` (Algorithm 2, J phi_h steps from t_s to t_e, each image its own
mask and trajectory) and ``null_text_inversions`` (Eq. 4, K steps, no early stop).

    python -m benchmarks.batching --backend tiny --name batching-tiny-cpu
    python -m benchmarks.batching --arch sd14 --sample-size 64 --dtype bf16 --steps 50 --name batching-sd14-gpu-bf16
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.report import report
from hifi import load_backend
from hifi.algorithms.generate import generate
from hifi.algorithms.guidance import reference_guided_sample
from hifi.algorithms.null_text import NullTextConfig, null_text_inversions
from hifi.algorithms.sampling import ddim_invert
from hifi.algorithms.subject import Subject
from hifi.execution.edge import Execution
from hifi.execution.memory import peak_memory, reset_peak_memory
from hifi.kernels.ddim import DdimGrid
from hifi.protocols.denoiser import DenoiserBackend


def _sync(backend: DenoiserBackend) -> None:
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)


def _timed(backend: DenoiserBackend, fn: Callable[[], Any]) -> tuple[float, dict[str, Any]]:
    reset_peak_memory(backend.device)
    _sync(backend)
    start = time.perf_counter()
    fn()
    _sync(backend)
    return time.perf_counter() - start, peak_memory(backend.device)


def stages(backend: DenoiserBackend, batch: int, steps: int, phi_steps: int,
           accel: str) -> dict[str, Callable[[], Any]]:
    """The three loops at batch ``batch``, as callables (their inputs made once, untimed)."""
    execution = Execution(accel, backend.device)
    model = execution.model(backend.denoise)
    side = backend.resolution // backend.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, backend.latent_channels, side, side, generator=g).to(backend.device, backend.dtype)
    grid = DdimGrid.build(backend.schedule, steps)
    with torch.no_grad():
        cond = backend.encode_text(["a photo of a dog on the beach"] * batch)
        trajectory = ddim_invert(model, grid, 0.5 * x, cond)
    mask = torch.zeros(batch, 1, side, side, dtype=torch.bool, device=backend.device)
    for b in range(batch):  # each image its own mask
        mask[b, :, side // 4 : 3 * side // 4, (b % 3) : side - 2 + (b % 3)] = True
    subject = Subject.plain("dog")
    seeds = list(range(batch))
    t_start, t_end = max(1, int(steps * 0.8)), max(1, int(steps * 0.2))
    null_text = NullTextConfig(num_steps=steps, inner_steps=phi_steps, tolerance=0.0)
    return {
        "plain generation (Eq. 7)": lambda: generate(backend, subject, "a dog on the beach", seeds, num_steps=steps,
                                                     model=model),
        f"reference-guided loop (Algorithm 2), J={phi_steps}": lambda: reference_guided_sample(
            model, grid, x, cond, trajectory, mask, uncond=backend.null_embedding(), t_start=t_start, t_end=t_end,
            phi_steps=phi_steps, optimiser=execution.runner),
        f"null-text inversion (Eq. 4), K={phi_steps}": lambda: null_text_inversions(
            model, grid, 0.5 * x, cond, backend.null_embedding(), null_text, optimiser=execution.runner),
    }


def run(backend: DenoiserBackend, label: str, batches: list[int], steps: int, phi_steps: int, accel: str,
        repeats: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    per_image_1: dict[str, float] = {}
    for batch in batches:
        for stage, fn in stages(backend, batch, steps, phi_steps, accel).items():
            fn()  # warm-up (and, in graph mode, capture)
            times: list[float] = []
            memory: dict[str, Any] = {}
            for _ in range(repeats):
                seconds, memory = _timed(backend, fn)
                times.append(seconds)
            best = min(times)
            per_image = best / batch
            per_image_1.setdefault(stage, per_image)
            rows.append({"stage": stage, "batch": batch, "seconds": best, "seconds_per_image": per_image,
                         "images_per_second": 1.0 / per_image, "vs_batch_1": per_image_1[stage] / per_image,
                         "peak_mb": memory.get("peak_mb")})
    return {
        "what": f"{label}, T = {steps}, J = K = {phi_steps}, accel {accel}, best of {repeats}",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
                   f"{torch.__version__}" + (f", {torch.cuda.get_device_name(backend.device)}"
                                             if backend.device.type == "cuda" else ""),
        "rows": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Batches: {result['what']}", "", f"Machine: {result['machine']}.", "",
             "| stage | batch | s per image | images/s | per-image speed vs batch 1 | peak MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"| {r['stage']} | {r['batch']} | {r['seconds_per_image']:.4f} | {r['images_per_second']:.2f} |"
                     f" {r['vs_batch_1']:.2f}x | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="tiny")
    p.add_argument("--arch", default=None, help="sd14, sd21, sdxl or sd3: the architecture with random weights")
    p.add_argument("--sample-size", type=int, default=8, help="latent side for --arch")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="with --arch")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--steps", type=int, default=10, help="T of every loop")
    p.add_argument("--phi-steps", type=int, default=10, help="J of Algorithm 2 and K of null-text inversion")
    p.add_argument("--accel", default="eager", choices=["eager", "compile", "graph"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--name", default=None, help="results file stem (benchmarks/results/NAME.json and .md)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.arch:
        from hifi_backends.sd3 import build_random_sd3
        from hifi_backends.sdxl import build_random_sdxl
        from hifi_backends.stable_diffusion import build_random_architecture

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        builders: dict[str, Callable[..., Any]] = {"sdxl": build_random_sdxl, "sd3": build_random_sd3}
        build = builders.get(args.arch, lambda **kw: build_random_architecture(args.arch, **kw))
        backend: DenoiserBackend = build(sample_size=args.sample_size, dtype=dtype)
        label = f"{args.arch} architecture (random weights), {backend.resolution}px, {args.dtype}"
    else:
        backend = load_backend(args.backend)
        label = f"{args.backend} backend"
    result = run(backend, label, [int(b) for b in args.batches.split(",")], args.steps, args.phi_steps, args.accel,
                 args.repeats)
    return report(result, to_markdown(result), args.name)


if __name__ == "__main__":
    raise SystemExit(main())
