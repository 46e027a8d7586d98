"""``hifi generate``: draw a tuned subject, reference-guided by default (Section 3.3).

Writes into ``--out``: one PNG per prompt and seed (``SLUG_seedS.png``), ``grid.png`` (a
row per prompt) and ``generate.json`` (prompts, seeds, settings and, per image, its file,
reference and fallback). With ``--save-intermediates`` each reference-guided image also
gets ``intermediates/SLUG_seedS/``: I_g1, both masks, the chosen and the warped reference,
``stages.json`` (similarity scores, fitted transform, caption, phi_h loss per step) and
``stages.png``, all of it side by side.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from torch import Tensor

from hifi.algorithms.reference import (
    ReferenceGuided,
    References,
    ReferenceSettings,
    first_pass,
    reference_guided_generate,
)
from hifi.cli.common import add_backend_flags, backend_from_args, warn
from hifi.errors import HifiError
from hifi.execution.fastpath import ACCEL_MODES, check_accel
from hifi.io.images import make_grid, save_image, tensor_to_image, write_json
from hifi.io.runs import apply_run, load_run
from hifi.perception_registry import configured_perception
from hifi.workflows.photos import load_references

RESULT_FILE = "generate.json"


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"


def _settings(args: argparse.Namespace) -> ReferenceSettings:
    return ReferenceSettings(
        guidance=args.guidance, num_steps=args.steps, t_start=args.t_start, t_end=args.t_end,
        phi_steps=args.phi_steps, phi_lr=args.phi_lr, accel=args.accel,
    )


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


# Command ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not args.no_reference:
        settings.check()  # before the minutes a backend may take to load
    if args.num_images < 1 or args.steps < 1:
        raise HifiError(f"--num-images and --steps must be at least 1, got {args.num_images} and {args.steps}")
    tuned = load_run(args.run)
    backend = backend_from_args(args, name=tuned.meta.backend, model=tuned.meta.model_id)
    check_accel(args.accel, backend.device)  # before any work
    subject = apply_run(tuned, backend)
    out = Path(args.out)
    progress = not args.quiet
    seeds = [args.seed + k for k in range(args.num_images)]
    perception = refs = None
    if not args.no_reference:
        perception = configured_perception(backend, segmenter=args.segmenter, embedder=args.embedder,
                                           captioner=args.captioner, device=args.device)
        refs, warnings = load_references(tuned, backend.resolution, perception.embedder)
        for w in warnings:
            warn(w)

    records: list[dict[str, Any]] = []
    finals: list[Image.Image] = []
    slugs: set[str] = set()
    for index, prompt in enumerate(args.prompt):
        slug = _slug(prompt)
        slug = f"{slug}-{index}" if slug in slugs else slug
        slugs.add(slug)
        for seed in seeds:
            stem = f"{slug}_seed{seed}"
            record: dict[str, Any] = {"file": f"{stem}.png", "prompt": prompt, "seed": seed}
            if perception is None or refs is None:
                drawn = first_pass(
                    backend, subject, prompt, seed, guidance=args.guidance, num_steps=args.steps,
                    record_attention=False, progress=progress, accel=args.accel,
                )
                final = tensor_to_image(drawn.image[0])
                record.update(reference_guided=False, fallback=False)
            else:
                result = reference_guided_generate(
                    backend, subject, prompt, seed, refs, perception, settings=settings, progress=progress,
                )
                final = tensor_to_image(result.image)
                record.update(
                    reference_guided=result.fallback is None,
                    fallback=result.fallback is not None,
                    fallback_reason=result.fallback,
                    warnings=list(result.warnings),
                    reference=result.reference_name,
                )
                for w in result.warnings:
                    warn(w)
                if args.save_intermediates:
                    folder = out / "intermediates" / stem
                    _save_intermediates(folder, result, refs, final)
                    record["intermediates"] = str(folder.relative_to(out))
                if not args.quiet:
                    print(_describe(stem, result))
            save_image(final, out / record["file"])
            records.append(record)
            finals.append(final)

    save_image(make_grid(finals, cols=len(seeds)), out / "grid.png")
    write_json(out / RESULT_FILE, {
        "run": str(tuned.path),
        "backend": backend.name,
        "model_id": backend.model_id,
        "mode": tuned.meta.mode,
        "prompts": list(args.prompt),
        "seeds": seeds,
        "reference_guided": not args.no_reference,
        "settings": {
            "guidance": settings.guidance, "num_steps": settings.num_steps,
            **({} if perception is None else {
                "t_start": settings.t_start, "t_end": settings.t_end, "phi_steps": settings.phi_steps,
                "phi_lr": settings.phi_lr, **perception.describe(),
            }),
        },
        "images": records,
        "grid": "grid.png",
    })
    fallbacks = sum(bool(r.get("fallback")) for r in records)
    note = f" ({fallbacks} fell back to plain generation)" if fallbacks else ""
    print(f"wrote {len(records)} images{note} to {out}")
    return 0


def _describe(stem: str, result: ReferenceGuided) -> str:
    """One line per image: what each stage chose."""
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


def register(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="draw a tuned subject (reference-guided, Section 3.3, unless --no-reference)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, help="run folder written by hifi tune")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt naming the subject with <subject> or its class word (repeatable)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt, seeds S, S+1, ... (default 4)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance w (default 7.5)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps T (default 50)")
    add_backend_flags(p, default=None)
    p.add_argument("--no-reference", action="store_true", help="plain Eq. 7 generation, no reference guidance")
    p.add_argument("--t-start", type=int, default=40,
                   help="t_s: the step index (T..1, T first) where guidance starts (default 40)")
    p.add_argument("--t-end", type=int, default=10, help="t_e: the step index where guidance ends (default 10)")
    p.add_argument("--phi-steps", type=int, default=10, help="J: Adam steps on phi_h per guided step (default 10)")
    p.add_argument("--phi-lr", type=float, default=1e-2, help="Adam learning rate for phi_h (default 1e-2)")
    p.add_argument("--save-intermediates", action="store_true",
                   help="also write every stage (I_g1, masks, reference, transform, phi_h losses)")
    p.add_argument("--accel", choices=ACCEL_MODES, default="eager",
                   help="run the forwards and phi_h steps eagerly, through torch.compile, or as CUDA graphs"
                        " (graph: CUDA only, UNet channels-last; same images within tolerance)")
    p.add_argument("--segmenter", default=None, help="attention, grounded-sam, sam (default: as configured)")
    p.add_argument("--embedder", default=None, help="dino, clip, vae-latent (default: configured, else vae-latent)")
    p.add_argument("--captioner", default=None, help="blip2, blip, template (default: configured, else template)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-image lines")
    p.set_defaults(func=run)
