"""Generation from a run folder: prompts and seeds in, images, a grid and ``generate.json`` out.

The workflow of ``hifi generate`` (Section 3.3; plain Eq. 7 generation with
``reference_guided=False``). Writes into ``out``: one PNG per prompt and seed
(``SLUG_seedS.png``), ``grid.png`` (a row per prompt) and ``generate.json`` (prompts,
seeds, settings and, per image, its file, reference and fallback). With
``save_intermediates`` each reference-guided image also gets ``intermediates/SLUG_seedS/``:
I_g1, both masks, the chosen and the warped reference, ``stages.json`` (similarity scores,
fitted transform, caption, phi_h loss per step) and ``stages.png``, all of it side by side.
It never prints: warnings and one line per guided image come back in the result.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from PIL import Image, ImageDraw
from torch import Tensor

from hifi.algorithms.reference import (
    FirstPass,
    ReferenceGuided,
    References,
    ReferenceSettings,
    first_passes,
    reference_guided_generate_many,
)
from hifi.errors import HifiError
from hifi.execution.edge import execution_for
from hifi.io.images import check_writable, make_grid, save_image, tensor_to_image, write_json
from hifi.io.runs import Run, apply_run
from hifi.perception.registry import configured_perception
from hifi.protocols.denoiser import DenoiserBackend, gradient_checkpointing
from hifi.workflows.checks import check_finite, check_seeds, check_step_count, check_subject_prompts
from hifi.workflows.photos import load_references

__all__ = [
    "GRID_FILE",
    "INTERMEDIATES_DIR",
    "RESULT_FILE",
    "GenerateResult",
    "GenerateSettings",
    "check_generate",
    "describe_image",
    "generate_from_run",
]

RESULT_FILE = "generate.json"
GRID_FILE = "grid.png"
INTERMEDIATES_DIR = "intermediates"


@attrs.frozen
class GenerateSettings:
    """How to draw: the seeds, the sampling and guidance knobs, and what to keep.

    ``reference`` holds the guidance weight and DDIM steps of every image and, when
    ``reference_guided``, the window of Algorithm 2. ``accel`` is the execution mode
    (:func:`hifi.execution.edge.execution_for`); the images do not depend on it beyond rounding.
    """

    num_images: int = 4
    seed: int = 0
    reference: ReferenceSettings = ReferenceSettings()
    reference_guided: bool = True
    save_intermediates: bool = False
    accel: str = "eager"
    gradient_checkpointing: bool = False
    """Recompute the denoiser's activations in the backward pass of the phi_h steps (less memory, more time)."""
    batch_size: int = 4
    """Up to this many seeds of a prompt are drawn, inverted and guided as one batch (each image as if alone,
    within rounding); on a GPU a batch costs little more than one image, on a CPU about B images."""

    def batches(self) -> list[list[int]]:
        """The seeds in batches of at most :attr:`batch_size`."""
        seeds = self.seeds
        return [seeds[i : i + self.batch_size] for i in range(0, len(seeds), self.batch_size)]

    @property
    def seeds(self) -> list[int]:
        """The seeds of each prompt's images: ``seed, seed + 1, ...``."""
        return [self.seed + k for k in range(self.num_images)]

    def check(self, num_train_timesteps: int | None = None) -> None:
        """Refuse settings that no image could be drawn with (``num_train_timesteps``: the model's schedule)."""
        if self.num_images < 1:
            raise HifiError(f"--num-images must be at least 1, got {self.num_images}")
        if self.batch_size < 1:
            raise HifiError(f"--batch-size must be at least 1, got {self.batch_size}")
        check_seeds(self.seed, self.num_images)
        check_finite({"--guidance": self.reference.guidance, "--phi-lr": self.reference.phi_lr})
        check_step_count(self.reference.num_steps, num_train_timesteps)
        if self.reference_guided:
            self.reference.check()


@attrs.frozen
class GenerateResult:
    """What :func:`generate_from_run` wrote and what happened on the way.

    ``records`` are ``generate.json``'s ``images`` (one per prompt and seed, in order);
    ``lines`` say, for each reference-guided image, what each stage chose.
    """

    out: Path
    images: tuple[Path, ...]
    grid: Path
    metadata: Path
    records: tuple[dict[str, Any], ...]
    lines: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def fallbacks(self) -> int:
        """How many guided images fell back to the plain generation."""
        return sum(bool(r.get("fallback")) for r in self.records)


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"


# Intermediates ---------------------------------------------------------------------------


def _loss_plot(result: ReferenceGuided, size: int) -> Image.Image:
    """phi_h's Eq. 10 loss, the J + 1 values of each guided step as one segment of the line."""
    img = Image.new("RGB", (size, size), "white")
    values = [v for s in result.losses for v in s.losses]
    if len(values) < 2:
        return img
    draw = ImageDraw.Draw(img)
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    margin = 6
    xs = [margin + k * (size - 2 * margin) / (len(values) - 1) for k in range(len(values))]
    ys = [size - margin - (v - low) / span * (size - 2 * margin) for v in values]
    start = 0
    for s in result.losses:
        n = len(s.losses)
        draw.line(list(zip(xs[start : start + n], ys[start : start + n], strict=True)), fill=(200, 30, 30), width=2)
        start += n
    return img


def _side_by_side(panels: list[tuple[str, Image.Image]], cell: int) -> Image.Image:
    label, pad = 14, 4
    sheet = Image.new("RGB", (len(panels) * (cell + pad) + pad, cell + label + 2 * pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (title, img) in enumerate(panels):
        x = pad + k * (cell + pad)
        draw.text((x, pad), title, fill="black")
        sheet.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, pad + label))
    return sheet


def _save_intermediates(folder: Path, result: ReferenceGuided, refs: References, final: Image.Image) -> None:
    """Every stage of one image as files, plus stages.png side by side and stages.json."""
    stages: list[tuple[str, str, Tensor | None]] = [
        ("I_g1", "i_g1.png", result.first.image[0]),
        ("M_g", "mask_g.png", None if result.generated_mask is None else result.generated_mask.float()),
    ]
    info: dict[str, Any] = {
        "seed": result.seed, "prompt": result.prompt, "fallback": result.fallback, "warnings": list(result.warnings),
    }
    if result.alignment is not None and result.reference is not None:
        k, fit = result.reference.index, result.alignment.fit
        stages += [
            (f"I_r {refs.names[k]} cos {result.reference.scores[k]:.3f}", "reference.png", refs.images[k]),
            ("M_r", "mask_r.png", refs.masks[k].float()),
            ("T(I_r)", "reference_warped.png", result.alignment.image),
            ("M_r*", "mask_r_warped.png", result.alignment.mask.float()),
        ]
        info.update(
            reference=refs.names[k],
            cosine=dict(zip(refs.names, result.reference.scores, strict=True)),
            transform={
                "scale": fit.scale, "angle_rad": fit.angle, "tx": fit.tx, "ty": fit.ty,
                "matrix": fit.matrix.tolist(), "residual_px": fit.residual,
            },
            caption=result.caption,
            phi_losses=[{"step": s.step, "timestep": s.timestep, "losses": list(s.losses)} for s in result.losses],
        )
    panels = []
    for title, name, tensor in stages:
        if tensor is not None:
            img = tensor_to_image(tensor)
            save_image(img, folder / name)
            panels.append((title, img))
    cell = max(128, final.size[0])
    panels.append(("I_g2" if result.fallback is None else "I_g1 (fallback)", final))
    if result.losses:
        panels.append(("phi_h loss", _loss_plot(result, cell)))
    save_image(_side_by_side(panels, cell), folder / "stages.png")
    write_json(folder / "stages.json", info)


def describe_image(stem: str, result: ReferenceGuided) -> str:
    """One line for one guided image: what each stage chose (or why it fell back)."""
    if result.fallback is not None or result.reference is None or result.alignment is None:
        return f"{stem}: plain generation ({result.fallback})"
    fit, k = result.alignment.fit, result.reference.index
    first, last = result.losses[0], result.losses[-1]
    return (
        f"{stem}: reference {result.reference_name} (cos {result.reference.scores[k]:.3f}),"
        f" transform scale {fit.scale:.2f} angle {math.degrees(fit.angle):.1f} deg"
        f" shift ({fit.tx:.1f}, {fit.ty:.1f}) px,"
        f" phi_h loss {first.losses[0]:.4g}->{first.losses[-1]:.4g} at t={first.step},"
        f" {last.losses[0]:.4g}->{last.losses[-1]:.4g} at t={last.step}"
    )


# The workflow ----------------------------------------------------------------------------


def check_generate(run: Run, out: str | Path, settings: GenerateSettings) -> None:
    """What :func:`generate_from_run` refuses before a model loads: the settings on the run's
    noise schedule, and an output folder that cannot be written. Creates nothing."""
    settings.check(run.meta.schedule.get("num_train_timesteps"))
    check_writable(out)


def generate_from_run(
    backend: DenoiserBackend,
    run: Run,
    prompts: Sequence[str],
    out: str | Path,
    *,
    settings: GenerateSettings | None = None,
    segmenter: str | None = None,
    embedder: str | None = None,
    captioner: str | None = None,
    progress: bool = False,
) -> GenerateResult:
    """Draw each prompt at each seed of ``settings`` with the run's subject, and write the files (module docstring).

    Reference-guided (Algorithm 2) by default, with the named perception models (else the
    configured ones, :func:`hifi.perception.registry.configured_perception`); plainly by
    Eq. 7 with ``settings.reference_guided=False``. Everything it can refuse (settings,
    output folder, execution mode, a run that does not fit the backend, prompts too long
    for the text encoder) it refuses before drawing. ``progress`` shows tqdm bars.
    """
    settings = settings or GenerateSettings()
    settings.check(backend.schedule.num_train_timesteps)
    check_writable(out)
    if not prompts:
        raise HifiError("no prompt: pass --prompt at least once")
    out = Path(out)
    execution = execution_for(backend, settings.accel)
    model = execution.model(backend.denoise)
    subject = apply_run(run, backend)
    check_subject_prompts(backend, subject, prompts)
    sampling = settings.reference
    warnings: list[str] = []
    perception = refs = None
    if settings.reference_guided:
        perception = configured_perception(backend, segmenter=segmenter, embedder=embedder, captioner=captioner)
        refs, found = load_references(run, backend.resolution, perception.embedder)
        warnings.extend(found)

    records: list[dict[str, Any]] = []
    finals: list[Image.Image] = []
    lines: list[str] = []
    slugs: set[str] = set()
    with gradient_checkpointing(backend, settings.gradient_checkpointing):  # the phi_h steps' backward
        for index, prompt in enumerate(prompts):
            slug = _slug(prompt)
            slug = f"{slug}-{index}" if slug in slugs else slug
            slugs.add(slug)
            drawn_all: list[Any] = []
            for chunk in settings.batches():  # up to batch_size seeds of the prompt in one batch
                if perception is None or refs is None:
                    drawn_all += first_passes(
                        backend, subject, prompt, chunk, guidance=sampling.guidance, num_steps=sampling.num_steps,
                        record_attention=False, progress=progress, model=model,
                    )
                else:
                    drawn_all += reference_guided_generate_many(
                        backend, subject, prompt, chunk, refs, perception, settings=sampling, progress=progress,
                        model=model, optimiser=execution.runner,
                    )
            for seed, result in zip(settings.seeds, drawn_all, strict=True):
                stem = f"{slug}_seed{seed}"
                record: dict[str, Any] = {"file": f"{stem}.png", "prompt": prompt, "seed": seed}
                if isinstance(result, FirstPass):
                    final = tensor_to_image(result.image[0])
                    record.update(reference_guided=False, fallback=False)
                else:
                    final = tensor_to_image(result.image)
                    record.update(
                        reference_guided=result.fallback is None,
                        fallback=result.fallback is not None,
                        fallback_reason=result.fallback,
                        warnings=list(result.warnings),
                        reference=result.reference_name,
                    )
                    warnings.extend(result.warnings)
                    if settings.save_intermediates and refs is not None:
                        folder = out / INTERMEDIATES_DIR / stem
                        _save_intermediates(folder, result, refs, final)
                        record["intermediates"] = str(folder.relative_to(out))
                    lines.append(describe_image(stem, result))
                save_image(final, out / record["file"])
                records.append(record)
                finals.append(final)

    save_image(make_grid(finals, cols=settings.num_images), out / GRID_FILE)
    write_json(out / RESULT_FILE, {
        "run": str(run.path),
        "backend": backend.name,
        "model_id": backend.model_id,
        "mode": run.meta.mode,
        "prompts": list(prompts),
        "seeds": settings.seeds,
        "reference_guided": settings.reference_guided,
        "settings": {
            "guidance": sampling.guidance, "num_steps": sampling.num_steps,
            **({} if perception is None else {
                "t_start": sampling.t_start, "t_end": sampling.t_end, "phi_steps": sampling.phi_steps,
                "phi_lr": sampling.phi_lr, **perception.describe(),
            }),
        },
        "images": records,
        "grid": GRID_FILE,
    })
    return GenerateResult(
        out=out, images=tuple(out / r["file"] for r in records), grid=out / GRID_FILE, metadata=out / RESULT_FILE,
        records=tuple(records), lines=tuple(lines), warnings=tuple(warnings),
    )
