"""``hifi generate``: draw a tuned subject, reference-guided by default (Section 3.3).

Writes into ``--out``: one PNG per prompt and seed (``SLUG_seedS.png``), ``grid.png`` (a
row per prompt) and ``generate.json`` (prompts, seeds, settings and, per image, its file,
reference and fallback). With ``--save-intermediates`` each reference-guided image also
gets ``intermediates/SLUG_seedS/``: I_g1, both masks, the chosen and the warped reference,
``stages.json`` (similarity scores, fitted transform, caption, phi_h loss per step) and
``stages.png``, all of it side by side. The workflow is
:func:`hifi.workflows.generate.generate_from_run`.
"""

from __future__ import annotations

import argparse
from typing import Any

from hifi.algorithms.reference import ReferenceSettings
from hifi.cli.common import add_backend_flags, backend_from_args, warn
from hifi.execution.fastpath import ACCEL_MODES
from hifi.io.runs import check_compatible, load_run
from hifi.workflows.checks import unknown_word_warnings
from hifi.workflows.generate import GenerateSettings, check_generate, generate_from_run


def run(args: argparse.Namespace) -> int:
    settings = GenerateSettings(
        num_images=args.num_images, seed=args.seed, reference_guided=not args.no_reference,
        save_intermediates=args.save_intermediates, accel=args.accel,
        gradient_checkpointing=args.gradient_checkpointing, batch_size=args.batch_size,
        reference=ReferenceSettings(guidance=args.guidance, num_steps=args.steps, t_start=args.t_start,
                                    t_end=args.t_end, phi_steps=args.phi_steps, phi_lr=args.phi_lr),
    )
    tuned = load_run(args.run)
    check_generate(tuned, args.out, settings)  # before the minutes a backend may take to load
    backend = backend_from_args(args, name=tuned.meta.backend, model=tuned.meta.model_id)
    check_compatible(tuned.meta, backend)
    for w in unknown_word_warnings(backend, args.prompt, tuned.meta.class_name):
        warn(w)
    result = generate_from_run(
        backend, tuned, args.prompt, args.out, settings=settings, segmenter=args.segmenter,
        embedder=args.embedder, captioner=args.captioner, progress=not args.quiet,
    )
    for w in result.warnings:
        warn(w)
    if not args.quiet:
        for line in result.lines:
            print(line)
    note = f" ({result.fallbacks} fell back to plain generation)" if result.fallbacks else ""
    print(f"wrote {len(result.records)} images{note} to {result.out}")
    return 0


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
    p.add_argument("--batch-size", type=int, default=4,
                   help="seeds of a prompt drawn, inverted and guided together (default 4; each image as if alone)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the UNet's activations in the phi_h steps' backward pass (less memory, slower)")
    p.add_argument("--segmenter", default=None, help="attention, grounded-sam, sam (default: as configured)")
    p.add_argument("--embedder", default=None, help="dino, clip, vae-latent (default: configured, else vae-latent)")
    p.add_argument("--captioner", default=None, help="blip2, blip, template (default: configured, else template)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-image lines")
    p.set_defaults(func=run)
