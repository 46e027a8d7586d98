"""Per-stage benchmarks: each stage beside the naive way of writing it, measured in one run.

    python -m benchmarks.run --backend tiny
    python -m benchmarks.run --arch sd14 --sample-size 8        # SD1.4 architecture, 64x64, random weights
    python -m benchmarks.run --backend tiny-sdxl                # the tiny SDXL; --arch sdxl: SDXL base's architecture

Writes ``benchmarks/results/<name>.json`` and ``.md``: the median time of each stage and
of its naive counterpart, their ratio, and the process's peak memory (the GPU's peak
allocation on CUDA; on the CPU the process's peak resident set so far, which only grows).
Report ratios from one run side by side; absolute times are only meaningful on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.report import save_result
from hifi import load_backend
from hifi.algorithms.guidance import reference_guided_sample
from hifi.algorithms.null_text import NullTextConfig, null_text_inversion
from hifi.algorithms.sampling import ddim_invert, ddim_sample
from hifi.algorithms.subject import PLACEHOLDER
from hifi.algorithms.tune import TuneConfig, tune
from hifi.algorithms.tune_hifi import c_s_loss
from hifi.execution.edge import Bound, Execution, adam_steps
from hifi.execution.fastpath import ACCEL_MODES
from hifi.execution.memory import peak_memory, reset_peak_memory
from hifi.io.images import atomic_path
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import DdimGrid, add_noise, cfg_combine, ddim_step, ddim_timesteps
from hifi.kernels.losses import ridge_to_null, splice_subject, subject_slots
from hifi.protocols.denoiser import ChannelsLastBackend, DenoiserBackend, TextualInversionBackend


def _sync(backend: DenoiserBackend) -> None:
    if backend.device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(backend: DenoiserBackend) -> float:
    return float(peak_memory(backend.device)["peak_mb"])


def timed(backend: DenoiserBackend, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs (GPU peak memory reset first)."""
    reset_peak_memory(backend.device)
    for _ in range(warmup):
        fn()
    _sync(backend)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(backend)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Stages:
    """Each stage and its naive twin, sharing one set of inputs."""

    def __init__(self, backend: DenoiserBackend, batch: int, num_steps: int) -> None:
        self.b, self.batch, self.n = backend, batch, num_steps
        side = backend.resolution // backend.vae_scale_factor
        g = torch.Generator().manual_seed(0)
        dev, dt = backend.device, backend.dtype
        self.x0 = torch.randn(batch, backend.latent_channels, side, side, generator=g).to(dev, dt)
        self.mask = torch.ones(batch, 1, side, side, device=dev, dtype=dt)
        self.caption = "a photo of a dog"
        with torch.no_grad():
            self.c = backend.encode_text([self.caption])
            self.phi = backend.null_embedding()
        self.phi_s = subject_slots(self.phi, 5)[0].float()
        self.c_s = self.phi_s.clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.c_s], lr=5e-3)
        self.timesteps = backend.schedule.training_timesteps()
        self.c_s_loss = Bound(c_s_loss, backend.denoise, 1e-4)  # the shipped Eq. 6, as the tune runs it
        self.c_s_runner = adam_steps(self.c_s_loss, self.phi_s, 5e-3)
        self.has_ti = isinstance(backend, TextualInversionBackend)
        if isinstance(backend, TextualInversionBackend):
            backend.add_placeholder_token(PLACEHOLDER)
            self.vector = backend.input_embedding("dog").float().requires_grad_(True)
            self.ti_opt = torch.optim.Adam([self.vector], lr=5e-3)

    def _noisy(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.timesteps[torch.randint(0, len(self.timesteps), (self.batch,))]
        eps = torch.randn_like(self.x0)
        alpha, sigma = (v.to(self.x0) for v in self.b.schedule.levels(t))
        return add_noise(self.x0, eps, (alpha, sigma)), t.to(self.x0.device), eps

    def c_s_step(self) -> None:
        """One step of Eq. 6 (the shipped :func:`hifi.algorithms.tune_hifi.c_s_loss`), eager: the caption
        encoded once and all images in one batch."""
        self.c_s_runner(*self._noisy(), self.c, self.phi_s, self.mask)

    def accelerated_c_s_step(self, accel: str) -> Callable[[], None]:
        """The same shipped step through a runner in mode ``accel`` (its own c_s and Adam)."""
        runner = Execution(accel, self.b.device).runner(self.c_s_loss, self.phi_s, 5e-3)

        def step() -> None:
            runner(*self._noisy(), self.c, self.phi_s, self.mask)

        return step

    def c_s_step_naive(self) -> None:
        """The same step written naively: text encoder in the loop, one image per forward."""
        x_t, t, eps = self._noisy()
        self.opt.zero_grad()
        for i in range(self.batch):
            c = self.b.encode_text([self.caption])
            pred = self.b.denoise(x_t[i : i + 1], t[i : i + 1], splice_subject(c, self.c_s))
            loss = F.mse_loss(pred.float(), eps[i : i + 1].float()) / self.batch
            (loss + ridge_to_null(self.c_s, self.phi_s, 1e-4) / self.batch).backward()
        self.opt.step()

    def ti_step(self) -> None:
        """One classic Textual Inversion step (the text encoder is in its loop by design)."""
        x_t, t, eps = self._noisy()
        c = self.b.encode_text([f"a photo of a {PLACEHOLDER}"], token_embeddings={PLACEHOLDER: self.vector})
        loss = F.mse_loss(self.b.denoise(x_t, t, c).float(), eps.float())
        self.ti_opt.zero_grad()
        loss.backward()
        self.ti_opt.step()

    def stepwise_pass(self, naive: bool = False) -> None:
        """Algorithm 1 over the whole grid with I = 1 (the cost per c_s^t step)."""
        for _ in ddim_timesteps(self.b.schedule, self.n):
            (self.c_s_step_naive if naive else self.c_s_step)()

    def cfg_forward(self, accel: str = "eager") -> Callable[[], None]:
        """One classifier-free-guided UNet forward (both branches, one batch of 2), in mode ``accel``."""
        model = Execution(accel, self.b.device).model(self.b.denoise)
        x, emb = torch.cat([self.x0[:1]] * 2), Condition.cat([self.phi, self.c])

        def forward() -> None:
            with torch.no_grad():
                model(x, 500, emb)

        return forward

    def generation(self, accel: str = "eager") -> None:
        """N-step DDIM with guidance: both branches in one batched call."""
        model = Execution(accel, self.b.device).model(self.b.denoise)
        with torch.no_grad():
            ddim_sample(model, DdimGrid.build(self.b.schedule, self.n), self.x0[:1], self.c, uncond=self.phi)

    def generation_naive(self) -> None:
        """The same with the conditional and unconditional branches as two calls."""
        s = self.b.schedule
        with torch.no_grad():
            x = self.x0[:1]
            for step in DdimGrid.build(s, self.n).steps:
                out = cfg_combine(self.b.denoise(x, step.t, self.c), self.b.denoise(x, step.t, self.phi), 7.5)
                x = ddim_step(out, x, step.level, step.level_prev, s.prediction_type)

    def inversion(self) -> None:
        with torch.no_grad():
            ddim_invert(self.b.denoise, DdimGrid.build(self.b.schedule, self.n), self.x0[:1], self.c)

    @functools.cached_property
    def trajectory(self) -> Any:
        """The reference's DDIM inversion [x_0*, ..., x_T*]: an input of Algorithm 2, made once, untimed."""
        with torch.no_grad():
            return ddim_invert(self.b.denoise, DdimGrid.build(self.b.schedule, self.n), self.x0[:1], self.c)

    def guided(self, naive: bool = False, accel: str = "eager") -> None:
        """Algorithm 2's loop (t_s..t_e with J phi_h steps), the stage reference guidance adds.

        The reference's inversion is Algorithm 2's input, not part of it (:attr:`trajectory`,
        made before the timing starts); until 2026-11-27 it ran inside every timed call.
        """
        execution = Execution(accel, self.b.device)
        mask = torch.zeros(1, 1, *self.x0.shape[-2:], dtype=torch.bool, device=self.x0.device)
        mask[..., 1:-1, 1:-1] = True
        t_start, t_end = max(1, int(self.n * 0.8)), max(1, int(self.n * 0.2))
        reference_guided_sample(
            execution.model(self.b.denoise), DdimGrid.build(self.b.schedule, self.n), torch.randn_like(self.x0[:1]),
            self.c, self.trajectory, mask, uncond=self.phi, guidance=7.5, t_start=t_start, t_end=t_end, phi_steps=10,
            phi_lr=1e-2, naive=naive, optimiser=execution.runner,
        )

    def null_text(self, naive: bool = False, accel: str = "eager") -> None:
        """Null-text inversion (Eq. 4), K = 10, no early stop."""
        config = NullTextConfig(num_steps=self.n, inner_steps=10, tolerance=0.0, naive=naive)
        execution = Execution(accel, self.b.device)
        null_text_inversion(execution.model(self.b.denoise), DdimGrid.build(self.b.schedule, self.n), self.x0[:1],
                            self.c, self.phi, config, optimiser=execution.runner)

    def full_tune(self, accel: str = "eager", images: int = 3) -> None:
        """A default tune (TuneConfig(): the global stage, then Algorithm 1's I x T steps) on ``images`` photos."""
        g = torch.Generator().manual_seed(0)
        side = self.b.resolution
        photos = (torch.rand(images, 3, side, side, generator=g) * 2 - 1).to(self.b.device)
        execution = Execution(accel, self.b.device)
        tune(self.b, photos, "dog", config=TuneConfig(), model=execution.model(self.b.denoise),
             optimiser=execution.runner)


def _beside(backend: DenoiserBackend, stage: str, seconds: float, naive: str, naive_seconds: float) -> dict[str, Any]:
    """A result row: a stage timed beside its naive (or eager) twin, and the backend's peak memory."""
    return {"stage": stage, "seconds": seconds, "naive": naive, "naive_seconds": naive_seconds,
            "speedup": naive_seconds / seconds, "peak_mb": _peak_mb(backend)}


class _Rows(list[dict[str, Any]]):
    """The result rows; each is also written to stderr as it comes (a run cut short keeps them)."""

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)


def core_rows(backend: DenoiserBackend, s: Stages, accel: str, repeats: int) -> list[dict[str, Any]]:
    """The two fast-path cores (a c_s step, a CFG forward) in mode ``accel`` beside eager, in each
    UNet memory layout the backend can switch to (NCHW, channels-last) and, on CUDA, with cuDNN's
    autotuner (``torch.backends.cudnn.benchmark``) off and on: all in one run."""
    rows: list[dict[str, Any]] = _Rows()
    layouts = [False, True] if isinstance(backend, ChannelsLastBackend) else [False]
    tuners = [False, True] if backend.device.type == "cuda" else [False]
    was = bool(getattr(backend, "channels_last", False)), torch.backends.cudnn.benchmark
    try:
        for autotune in tuners:
            torch.backends.cudnn.benchmark = autotune
            for channels_last in layouts:
                if isinstance(backend, ChannelsLastBackend) and len(layouts) > 1:
                    backend.set_channels_last(channels_last)
                setting = "UNet channels-last" if channels_last else "UNet NCHW"
                setting += ", cudnn.benchmark" if autotune else ""
                cases = [("c_s step", s.accelerated_c_s_step(accel), s.c_s_step),
                         ("CFG forward (batch 2)", s.cfg_forward(accel), s.cfg_forward("eager"))]
                for stage, fast, eager in cases:
                    fast_s = timed(backend, fast, repeats, warmup=3)  # the first calls compile or capture
                    eager_s = timed(backend, eager, repeats, warmup=1)
                    rows.append(_beside(backend, f"{stage}, --accel {accel}, {setting}", fast_s,
                                        f"the same eager, {setting}", eager_s))
    finally:  # a failing row must not leave the backend switched
        if isinstance(backend, ChannelsLastBackend) and len(layouts) > 1:
            backend.set_channels_last(was[0])
        torch.backends.cudnn.benchmark = was[1]
    return rows


def run(backend: DenoiserBackend, label: str, batch: int, num_steps: int, repeats: int,
        loop_steps: int, accel: str | None = None, naive_loops: bool = True, full_tune: bool = False,
        full_tune_only: tuple[int, ...] = (), only: str | None = None) -> dict[str, Any]:
    """Every stage beside its naive twin; with ``accel``, each fast-path stage beside its eager self.

    ``naive_loops=False`` skips the naive twins of the two long loops (Algorithm 2 and
    null-text inversion); ``full_tune`` also times a default tune, eager and in mode ``accel``;
    ``full_tune_only`` (photo counts) times only that, once for each count; ``only="core"``
    times only :func:`core_rows` (the c_s step and the CFG forward, in both UNet layouts),
    ``only="loops"`` only Algorithm 2 and null-text inversion (T = ``loop_steps``), each in
    mode ``accel`` beside eager.
    """
    s = Stages(backend, batch, num_steps)
    rows: list[dict[str, Any]] = _Rows()
    def tune_stage(images: int) -> str:
        return f"full default tune (1000 + 10 x 50 steps, {images} image{'s' if images > 1 else ''} a step)"

    if only == "core":
        return _result(backend, label, batch, num_steps, repeats, core_rows(backend, s, accel or "eager", repeats))
    if full_tune_only:
        for images in full_tune_only:
            fast_s = timed(backend, functools.partial(s.full_tune, accel or "eager", images), 1, warmup=0)
            eager_s = timed(backend, functools.partial(s.full_tune, "eager", images), 1, warmup=0)
            rows.append(_beside(backend, f"{tune_stage(images)}, --accel {accel}", fast_s, "the same, eager", eager_s))
        return _result(backend, label, batch, num_steps, repeats, rows)
    loops = Stages(backend, batch, loop_steps) if loop_steps != num_steps else s
    long_loops = {
        f"reference-guided loop (Algorithm 2), J=10, T={loop_steps}": loops.guided,
        f"null-text inversion (Eq. 4), K=10, T={loop_steps}": loops.null_text,
    }
    guided_repeats = max(1, repeats // 2)
    loops.trajectory  # noqa: B018 -- Algorithm 2's input, made before any timing
    if only == "loops":
        for stage, loop in long_loops.items():
            fast_s = timed(backend, functools.partial(loop, accel=accel or "eager"), guided_repeats, warmup=0)
            eager_s = timed(backend, loop, guided_repeats, warmup=0)
            rows.append(_beside(backend, f"{stage}, --accel {accel}", fast_s, "the same, eager", eager_s))
        return _result(backend, label, batch, num_steps, repeats, rows)

    def measure(stage: str, fast: Callable[[], Any], naive: Callable[[], Any] | None, naive_label: str) -> None:
        fast_s = timed(backend, fast, repeats)
        row: dict[str, Any] = {"stage": stage, "seconds": fast_s, "peak_mb": _peak_mb(backend)}
        if naive is not None:
            naive_s = timed(backend, naive, repeats)
            row.update(naive=naive_label, naive_seconds=naive_s, speedup=naive_s / fast_s)
        rows.append(row)

    measure("c_s step (Eq. 6)", s.c_s_step, s.c_s_step_naive, "text encoder in the loop, one image per forward")
    if accel is not None and accel != "eager":
        fast = s.accelerated_c_s_step(accel)
        fast_s = timed(backend, fast, repeats, warmup=3)  # the first calls compile or capture
        eager_s = timed(backend, s.c_s_step, repeats)
        rows.append(_beside(backend, f"c_s step, --accel {accel}", fast_s, "the same step eager", eager_s))
    if s.has_ti:
        measure("classic TI step (Eq. 2)", s.ti_step, s.c_s_step, "ratio: c_s step vs TI step")
        rows[-1]["naive"] = "c_s step (speedup = TI time / c_s time)"
        rows[-1]["naive_seconds"], rows[-1]["speedup"] = rows[0]["seconds"], rows[-1]["seconds"] / rows[0]["seconds"]
    measure(f"step-wise pass, I=1, T={num_steps}", s.stepwise_pass, lambda: s.stepwise_pass(naive=True),
            "text encoder in the loop, one image per forward")
    measure(f"{num_steps}-step generation (CFG)", s.generation, s.generation_naive, "CFG branches as two calls")
    measure(f"DDIM inversion, {num_steps} steps", s.inversion, None, "")
    for stage, loop in long_loops.items():
        if naive_loops:
            fast_s, naive_s = (timed(backend, functools.partial(loop, naive=n), guided_repeats) for n in (False, True))
            rows.append(_beside(backend, stage, fast_s, "conditional branch recomputed with gradients", naive_s))
        else:
            rows.append({"stage": stage, "seconds": timed(backend, loop, guided_repeats, warmup=0),
                         "peak_mb": _peak_mb(backend)})
    if accel is not None and accel != "eager":
        # Each stage in mode `accel` beside the same stage eager, timed one after the other
        # (the long loops' eager times are the rows above, from this run). A loop captures
        # (or compiles) its graphs inside every call: that cost is in its time.
        beside: list[tuple[str, Callable[[], Any], Callable[[], Any] | float, int, int]] = [
            ("CFG forward (batch 2)", s.cfg_forward(accel), s.cfg_forward("eager"), repeats, 3),
            (f"{num_steps}-step generation (CFG)", lambda: s.generation(accel), s.generation, repeats, 1),
        ]
        eager_rows = {r["stage"]: r["seconds"] for r in rows}
        beside += [(stage, functools.partial(loop, accel=accel), eager_rows[stage], guided_repeats, 0)
                   for stage, loop in long_loops.items()]
        if full_tune:
            beside.append((tune_stage(3), lambda: s.full_tune(accel), s.full_tune, 1, 0))
        for stage, fast, eager, n, warmup in beside:
            name = f"{stage}, --accel {accel}"
            try:
                fast_s = timed(backend, fast, n, warmup=warmup)
                eager_s = eager if isinstance(eager, float) else timed(backend, eager, n, warmup=warmup)
            except Exception as error:  # a failed fast path is a result too: say so, keep the other rows
                rows.append({"stage": name, "error": f"{type(error).__name__}: {error}"[:500]})
                continue
            rows.append(_beside(backend, name, fast_s, "the same, eager", eager_s))
    return _result(backend, label, batch, num_steps, repeats, rows)


def _result(backend: DenoiserBackend, label: str, batch: int, num_steps: int, repeats: int,
            rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "label": label, "backend": backend.name, "model_id": backend.model_id, "device": str(backend.device),
        "dtype": str(backend.dtype), "resolution": backend.resolution, "batch": batch, "num_steps": num_steps,
        "repeats": repeats, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if backend.device.type == "cuda" else None,
        "torch": torch.__version__, "rows": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# {result['label']}",
        "",
        f"backend `{result['backend']}` ({result['model_id']}), {result['device']} {result['dtype']},"
        f" {result['resolution']}px, batch {result['batch']}, {result['num_steps']} DDIM steps,"
        f" median of {result['repeats']}; machine: {result['gpu'] or result['machine']},"
        f" {result['cpu_threads']} threads, torch {result['torch']}.",
        "",
        "| stage | time (s) | naive way | naive time (s) | speedup | peak MB |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['stage']} | failed: {r['error']} | | | | |")
            continue
        naive = r.get("naive", "")
        naive_s = f"{r['naive_seconds']:.4f}" if "naive_seconds" in r else ""
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        lines.append(f"| {r['stage']} | {r['seconds']:.4f} | {naive} | {naive_s} | {speed} | {r['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="tiny")
    p.add_argument("--arch", default=None, help="sd14, sd21, sdxl or sd3: the architecture with random weights")
    p.add_argument("--sample-size", type=int, default=8, help="latent side for --arch (8 = 64x64 images)")
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--name", default=None, help="results file stem")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="with --arch")
    p.add_argument("--loop-steps", type=int, default=None, help="T of the guided and null-text loops")
    p.add_argument("--accel", default=None, choices=ACCEL_MODES,
                   help="also time each fast-path stage in this mode beside the eager one (compile; graph on CUDA)")
    p.add_argument("--no-naive-loops", action="store_true",
                   help="skip the naive twins of Algorithm 2 and null-text inversion (they are the slowest rows)")
    p.add_argument("--full-tune", action="store_true", help="with --accel: time a default tune, eager and accelerated")
    p.add_argument("--full-tune-only", type=int, nargs="+", default=None, metavar="PHOTOS",
                   help="time only default tunes on this many photos (each count), eager and with --accel")
    p.add_argument("--only", choices=["core", "loops"], default=None,
                   help="core: only a c_s step and a CFG forward, eager and with --accel, with the UNet NCHW and"
                        " channels-last; loops: only Algorithm 2 and null-text inversion, eager and with --accel")
    p.add_argument("--channels-last", action="store_true",
                   help="with --arch: hold the UNet channels-last for the whole run")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms for these shapes (torch.backends.cudnn.benchmark)")
    p.add_argument("--markdown", type=Path, default=None, metavar="JSON",
                   help="only write the Markdown table of a results JSON beside it (e.g. one a GPU machine sent back)")
    args = p.parse_args(argv)
    if args.markdown is not None:
        try:
            result = json.loads(args.markdown.read_text())
            table = to_markdown(result)
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"benchmarks.run: {args.markdown} is not a results JSON ({type(error).__name__}: {error})",
                  file=sys.stderr)
            return 2
        with atomic_path(args.markdown.with_suffix(".md")) as tmp:
            tmp.write_text(table)
        print(table)
        return 0
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.arch:
        from hifi_backends.sd3 import build_random_sd3
        from hifi_backends.sdxl import build_random_sdxl
        from hifi_backends.stable_diffusion import build_random_architecture

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        builders = {"sdxl": build_random_sdxl, "sd3": build_random_sd3}
        build = builders.get(args.arch, functools.partial(build_random_architecture, args.arch))
        sd = build(sample_size=args.sample_size, dtype=dtype)
        if args.channels_last:
            sd.set_channels_last()
        backend: DenoiserBackend = sd
        label = f"{args.arch} architecture (random weights), {backend.resolution}px"
        label += ", UNet channels-last" if args.channels_last else ""
    else:
        backend = load_backend(args.backend)
        label = f"{args.backend} backend"
    label += ", cudnn.benchmark" if args.cudnn_benchmark else ""
    result = run(backend, label, args.batch, args.steps, args.repeats, args.loop_steps or args.steps, args.accel,
                 naive_loops=not args.no_naive_loops, full_tune=args.full_tune,
                 full_tune_only=tuple(args.full_tune_only or ()), only=args.only)
    name = args.name or (f"{args.arch}-{backend.device.type}" if args.arch else f"{args.backend}-{backend.device.type}")
    wrote = save_result(name, result, to_markdown(result))
    print(to_markdown(result))
    print(json.dumps({"wrote": str(wrote)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
