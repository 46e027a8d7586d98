"""``hifi demo``: tune on a ToyWorld subject (or your photos), generate plain and guided, write a grid and a table."""

from __future__ import annotations

import argparse
from typing import Any

from hifi.algorithms.reference import ReferenceSettings
from hifi.algorithms.tune import TuneConfig
from hifi.cli.common import add_backend_flags, backend_from_args, warn
from hifi.toyworld.world import CLASSES, SCENES
from hifi.workflows.checks import check_tune, check_tune_config, unknown_word_warnings
from hifi.workflows.demo import DEMO_PROMPTS, run_demo

TOY_PHOTOS = (
    f"the toy backend is ToyWorld's model, trained here on 64x64 renders of {len(CLASSES)} toy classes"
    f" ({', '.join(CLASSES)}) in {len(SCENES)} scenes: from your photos it can learn colours and a rough shape,"
    " not draw the real thing; with real weights: hifi demo --backend sd14 --model /models/sd-v1-4"
    " --photos DIR --class-name CLASS"
)
"""What ``--photos`` on the toy backend can and cannot show, and the command for real weights."""


def run(args: argparse.Namespace) -> int:
    config = TuneConfig(steps=args.steps, stepwise_steps=args.stepwise_steps, num_steps=args.ddim_steps,
                        checkpoint_every=50)
    reference = ReferenceSettings(num_steps=args.ddim_steps, t_start=args.t_start, t_end=args.t_end,
                                  phi_steps=args.phi_steps)
    reference.check()  # the guided half runs after the tune: refuse its window first
    check_tune_config(config, args.out)  # before a model loads
    backend = backend_from_args(args)
    check_tune(backend, args.class_name or "", config)
    for w in unknown_word_warnings(backend, DEMO_PROMPTS, args.class_name):
        warn(w)
    if args.photos and backend.name == "toy":
        warn(TOY_PHOTOS)
    result = run_demo(args.out, backend, photos=args.photos, masks=args.masks, class_name=args.class_name,
                      toy_subject=args.subject, config=config, reference=reference, progress=not args.quiet)
    for w in result.warnings:
        warn(w)
    print(result.table)
    print(f"wrote {result.grid} (rows, each with its figure: the photos, their masks, untuned generations of the"
          " class word and of a ToyWorld subject's exact description, plain and guided generations, the masks"
          " found in the guided ones) and metrics.md / metrics.json")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="the whole method on a ToyWorld subject (or --photos):"
                       " tune, generate, grid and table")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    add_backend_flags(p, default="toy")
    p.add_argument("--subject", default="striped_mug",
                   help="ToyWorld subject to learn (default striped_mug; see hifi.toyworld.SUBJECTS)")
    p.add_argument("--photos", default=None, help="your own photos instead (a folder); needs --class-name")
    p.add_argument("--masks", default=None, help="masks for --photos (a folder, same file names)")
    p.add_argument("--class-name", default=None, help="the class word of --photos (dog, can, ...)")
    p.add_argument("--steps", type=int, default=200, help="c_s steps (default 200)")
    p.add_argument("--stepwise-steps", type=int, default=5, help="I of Algorithm 1 (default 5)")
    p.add_argument("--ddim-steps", type=int, default=20, help="T (default 20)")
    p.add_argument("--t-start", type=int, default=16, help="t_s of Algorithm 2 (default 16 of 20)")
    p.add_argument("--t-end", type=int, default=4, help="t_e of Algorithm 2 (default 4 of 20)")
    p.add_argument("--phi-steps", type=int, default=3, help="J of Algorithm 2 (default 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
