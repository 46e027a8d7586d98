"""The full-size path on a GPU: SD1.4's (or SDXL's) architecture with random weights, every stage, every precision.

    python -m benchmarks.gpu_check                              # cuda: sd14 at 512x512, fp32/fp16/bf16, sdpa+xformers
    python -m benchmarks.gpu_check --backend sdxl --sample-size 128 --precisions bf16 --attention sdpa \
        --gradient-checkpointing                                # cuda: SDXL at 1024x1024, bf16
    python -m benchmarks.gpu_check --device cpu --backend tiny  # CPU mode (CI): the tiny backend, fp32, sdpa
    python -m benchmarks.gpu_check --device cpu --backend tiny-sdxl   # the same on the tiny SDXL (tiny-sd3: SD 3)

For each precision and attention kernel it builds the backend (no download: random weights
from the shipped configs, ``build_random_architecture``), then runs, timed, with the peak
memory of each stage:

- ``tune_global`` and ``tune_stepwise``: a shortened tune (Eq. 6, then Algorithm 1);
- ``generate``: plain generation (Eq. 7);
- ``reference_guided``: Algorithm 2 with the weight-free perception;
- ``replace``: subject replacement (Algorithm 3: null-text inversion, prompt-to-prompt);
- ``perception`` (once, fp32): every model-backed perception model, ``random:tiny``, on the device.

Every output is checked finite and of the right shape. The report is JSON on stdout (and
``--out FILE``); the exit status is 1 when a check failed. xformers is tried where its
kernels load and reported as skipped (with the reason) where they do not. Random weights
draw no subject, so the reference-guided stage is given the first photo's mask as M_g: the
check is that the guided loop runs at full size, not that a segmenter finds a subject.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import torch
from torch import Tensor

from hifi.algorithms.generate import generate
from hifi.algorithms.null_text import NullTextConfig
from hifi.algorithms.reference import ReferenceSettings, prepare_references, reference_guided_generate
from hifi.algorithms.replace import replace_subject
from hifi.algorithms.tune import TuneConfig, tune
from hifi.io.images import atomic_path
from hifi.io.synthetic import draw_subject_photos
from hifi.perception import Perception, default_perception
from hifi.protocols.denoiser import DenoiserBackend, gradient_checkpointing
from hifi.registry import load_backend
from hifi.workflows.photos import load_subject_photos

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CLASS_NAME = "box"


@attrs.frozen
class MaskSegmenter:
    """M_g given, not found: random weights draw no subject (see the module docstring)."""

    mask: Tensor
    name: str = "given-mask"
    wants_attention: bool = False

    def segment(self, images: Tensor, class_name: str, attention: Tensor | None = None) -> Tensor:
        return self.mask.to(images.device).expand(images.shape[0], *self.mask.shape[-2:]).bool()


class Recorder:
    """Per-stage wall time (synchronised) and peak memory, and the checks on each output."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stages: dict[str, dict[str, float]] = {}
        self.checks: dict[str, str] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak so far

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        self._sync()
        self.stages[name] = {"seconds": round(time.perf_counter() - start, 4), "peak_mb": round(self._peak_mb(), 1)}

    def check(self, name: str, tensor: Tensor | None, shape: tuple[int, ...] | None = None) -> None:
        """Record ``ok`` or what is wrong: missing, wrong shape, or not finite."""
        if tensor is None:
            self.checks[name] = "missing"
        elif shape is not None and tuple(tensor.shape) != shape:
            self.checks[name] = f"shape {tuple(tensor.shape)}, expected {shape}"
        elif not bool(torch.isfinite(tensor.float()).all()):
            self.checks[name] = "not finite"
        else:
            self.checks[name] = "ok"


def build_backend(args: argparse.Namespace, precision: str, attention: str) -> DenoiserBackend:
    """The backend under test with the attention kernel set; raises where the kernel does not load."""
    if args.backend in ("tiny", "tiny-sdxl", "tiny-sd3"):
        backend = load_backend(args.backend, device=args.device)
    elif args.backend in ("sdxl", "sd3"):
        from hifi_backends.sd3 import build_random_sd3
        from hifi_backends.sdxl import build_random_sdxl

        build = build_random_sdxl if args.backend == "sdxl" else build_random_sd3
        backend = build(sample_size=args.sample_size, device=args.device, dtype=PRECISIONS[precision])
    else:
        from hifi_backends.stable_diffusion import build_random_architecture

        backend = build_random_architecture(
            args.backend, sample_size=args.sample_size, device=args.device, dtype=PRECISIONS[precision]
        )
    unet: Any = getattr(backend, "unet", None)
    if attention == "xformers":
        if unet is None:
            raise RuntimeError("the backend has no diffusers UNet to give xformers kernels")
        unet.enable_xformers_memory_efficient_attention()
    elif unet is not None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        backend.set_attn_processor(AttnProcessor2_0())
    return backend


def run_stages(backend: DenoiserBackend, args: argparse.Namespace, rec: Recorder) -> None:
    """Every stage once on ``backend``, timed and checked."""
    size = backend.resolution
    latent = size // backend.vae_scale_factor
    with tempfile.TemporaryDirectory() as folder:
        photos_dir, masks_dir = draw_subject_photos(folder, n=3)
        photos = load_subject_photos(photos_dir, size, masks_dir)
    images = photos.images.to(backend.device, backend.dtype)
    masks = photos.masks.to(backend.device)

    global_end: list[float] = []

    def on_step(stage: str, step: int, loss: float) -> None:
        if stage == "global":  # the loss is read back per step, so the clock is synchronised here
            global_end[:] = [time.perf_counter()]

    config = TuneConfig(steps=args.tune_steps, stepwise_steps=args.stepwise_steps, num_steps=args.ddim_steps,
                        gradient_checkpointing=args.gradient_checkpointing)
    start = time.perf_counter()
    with rec.stage("tune"):
        result = tune(backend, images, CLASS_NAME, masks=masks, config=config, on_step=on_step)
    total = rec.stages.pop("tune")
    split = global_end[0] - start if global_end else 0.0
    rec.stages["tune_global"] = {"seconds": round(split, 4), "peak_mb": total["peak_mb"]}
    rec.stages["tune_stepwise"] = {"seconds": round(total["seconds"] - split, 4), "peak_mb": total["peak_mb"]}
    subject = result.subject
    rec.check("c_s", subject.c_s)
    rec.check("c_s^t", torch.stack(list(subject.stepwise.values())) if subject.stepwise else None,
              (args.ddim_steps, *subject.c_s.shape) if subject.c_s is not None else None)

    prompt = f"a {CLASS_NAME} on the beach"
    with rec.stage("generate"):
        drawn = generate(backend, subject, prompt, [0], num_steps=args.ddim_steps)
    rec.check("generate", drawn.images, (1, 3, size, size))

    base = default_perception(backend)
    perception = Perception(MaskSegmenter(masks[0]), base.embedder, base.captioner)
    settings = ReferenceSettings(num_steps=args.ddim_steps, t_start=args.ddim_steps - 1, t_end=1,
                                 phi_steps=args.phi_steps)
    with rec.stage("reference_guided"), gradient_checkpointing(backend, args.gradient_checkpointing):
        refs = prepare_references(images, masks > 0.5, photos.names, perception.embedder)
        guided = reference_guided_generate(backend, subject, prompt, 0, refs, perception, settings=settings)
    rec.check("reference_guided", guided.image, (3, size, size))
    rec.checks["reference_guided_fallback"] = "ok" if guided.fallback is None else f"fell back: {guided.fallback}"
    rec.check("reference_guided_latents", guided.latents, (1, backend.latent_channels, latent, latent))

    null_text = NullTextConfig(num_steps=args.ddim_steps, inner_steps=args.phi_steps)
    with rec.stage("replace"):
        edit = replace_subject(backend, subject, images[0], f"a photo of a {CLASS_NAME}", CLASS_NAME, config=null_text)
    rec.check("replace", edit.image, (3, size, size))
    rec.check("replace_reconstruction", edit.reconstruction, (3, size, size))


def run_perception(device: str, rec: Recorder) -> None:
    """Every model-backed perception model, random tiny weights, on ``device``."""
    from hifi.perception.registry import load_captioner, load_embedder, load_segmenter

    images = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = images.to(device)
    with rec.stage("perception"):
        for name in ("dino", "clip"):
            embedder = load_embedder(name, model="random:tiny", device=device)
            rec.check(f"perception_{name}", embedder.embed(images))
        for name in ("grounded-sam", "sam"):
            try:
                segmenter = load_segmenter(name, model="random:tiny", device=device, box_threshold=0.0)
            except Exception as err:  # segment-anything may not be installed there
                rec.checks[f"perception_{name}"] = f"skipped ({type(err).__name__}: {err})"
                continue
            rec.check(f"perception_{name}", segmenter.segment(images, CLASS_NAME), (2, 96, 80))
        for name in ("blip2", "blip"):
            captions = load_captioner(name, model="random:tiny", device=device, max_new_tokens=4).caption(
                images, CLASS_NAME)
            ok = len(captions) == 2 and all(isinstance(c, str) and CLASS_NAME in c for c in captions)
            rec.checks[f"perception_{name}"] = "ok" if ok else f"captions {captions!r}"


def _guard(rec: Recorder, name: str, fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)``, an exception recorded as a failed check ``name`` rather than raised."""
    try:
        fn(*args)
    except Exception as err:
        rec.checks[name] = f"error: {type(err).__name__}: {err}"
        rec.checks[f"{name}_traceback"] = traceback.format_exc(limit=6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="sd14",
                        help="sd14, sd21, sdxl, sd3 (random weights), tiny, tiny-sdxl or tiny-sd3")
    parser.add_argument("--sample-size", type=int, default=64,
                        help="UNet latent side (64: 512x512 images; 128: SDXL's 1024x1024)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute the UNet's activations in the backward passes of the tune and phi_h steps")
    parser.add_argument("--precisions", default=None, help="comma list (default fp32,fp16,bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--attention", default=None, help="comma list (default sdpa,xformers on cuda, sdpa on cpu)")
    parser.add_argument("--tune-steps", type=int, default=4)
    parser.add_argument("--stepwise-steps", type=int, default=1, help="I of Algorithm 1 per DDIM step")
    parser.add_argument("--ddim-steps", type=int, default=4)
    parser.add_argument("--phi-steps", type=int, default=2, help="phi_h and null-text Adam steps per DDIM step")
    parser.add_argument("--no-perception", action="store_true", help="skip the tiny perception models")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    precisions = (args.precisions or ("fp32,fp16,bf16" if cuda else "fp32")).split(",")
    attentions = (args.attention or ("sdpa,xformers" if cuda else "sdpa")).split(",")
    if cuda and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device here; run with --device cpu"}))
        return 1
    device = torch.device(args.device)

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": [],
        "skipped": [],
    }
    for precision in precisions:
        for attention in attentions:
            rec = Recorder(device)
            torch.manual_seed(0)
            try:
                backend = build_backend(args, precision, attention)
            except Exception as err:  # a kernel that does not load here is reported, not fatal
                report["skipped"].append({"precision": precision, "attention": attention,
                                          "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
                continue
            _guard(rec, "stages", run_stages, backend, args, rec)
            report["runs"].append({
                "precision": precision, "attention": attention, "backend": backend.model_id,
                "resolution": backend.resolution, "stages": rec.stages, "checks": rec.checks,
                "ok": all(v == "ok" for k, v in rec.checks.items() if not k.endswith("_traceback")),
            })
            del backend
            if cuda:
                torch.cuda.empty_cache()
    if not args.no_perception:
        rec = Recorder(device)
        _guard(rec, "perception", run_perception, args.device, rec)
        report["perception"] = {"stages": rec.stages, "checks": rec.checks,
                                "ok": all(v == "ok" or v.startswith("skipped") for k, v in rec.checks.items()
                                          if not k.endswith("_traceback"))}
    report["ok"] = bool(report["runs"]) and all(r["ok"] for r in report["runs"]) and report.get(
        "perception", {"ok": True})["ok"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
