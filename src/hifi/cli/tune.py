"""``hifi tune``: learn a subject from a folder of photos into a run folder."""

from __future__ import annotations

import argparse
from typing import Any

from hifi.algorithms.subject import MODES
from hifi.algorithms.tune import TuneConfig
from hifi.cli.common import add_backend_flags, backend_from_args, warn
from hifi.execution.fastpath import ACCEL_MODES
from hifi.workflows.checks import check_tune, check_tune_config, unknown_word_warnings
from hifi.workflows.tune import tune_to_run


def run(args: argparse.Namespace) -> int:
    config = TuneConfig(
        mode=args.mode, steps=args.steps, lr=args.lr, num_tokens=args.tokens, reg_weight=args.reg_weight,
        use_mask=not args.no_mask, stepwise_steps=args.stepwise_steps, num_steps=args.ddim_steps,
        seed=args.seed, checkpoint_every=args.checkpoint_every, prior_preservation=args.prior_preservation,
        num_class_images=args.class_images, gradient_checkpointing=args.gradient_checkpointing,
        lora_rank=args.lora_rank,
    )
    check_tune_config(config, args.out)  # before a model loads
    backend = backend_from_args(args)
    check_tune(backend, args.class_name, config)
    for w in unknown_word_warnings(backend, [], args.class_name):
        warn(w)
    outcome = tune_to_run(
        backend, args.subject, args.class_name, args.out, config=config, masks=args.masks,
        resume=args.resume, samples=args.samples, progress=not args.quiet, accel=args.accel,
    )
    for w in outcome.warnings:
        warn(w)
    loss = "" if outcome.final_loss is None else f" (final loss {outcome.final_loss:.4f})"
    print(f"wrote run {outcome.run_dir}{loss}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("tune", help="learn a subject from 3-6 photos (Section 3.2, Algorithm 1)")
    p.add_argument("--subject", required=True, help="folder of 3-6 photos of the subject")
    p.add_argument("--class-name", required=True, help='the subject\'s class word, e.g. "dog"')
    p.add_argument("--out", required=True, help="run folder to write")
    add_backend_flags(p)
    p.add_argument("--masks", default="none", help="DIR (a mask per photo, same names), none, or auto")
    p.add_argument("--mode", choices=MODES, default="hifi", help="hifi (default), classic-ti, dreambooth")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (1000 hifi/ti, 400 dreambooth)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (5e-3 hifi/ti, 5e-6 dreambooth, 1e-4 dreambooth --lora-rank)")
    p.add_argument("--tokens", type=int, default=5, help="tokens n in c_s (default 5)")
    p.add_argument("--reg-weight", type=float, default=1e-4, help="w_s of Eq. 6; 0 switches the regulariser off")
    p.add_argument("--no-mask", action="store_true", help="plain loss (Eq. 2) instead of the masked loss (Eq. 5)")
    p.add_argument("--stepwise-steps", type=int, default=10, help="I of Algorithm 1; 0 switches step-wise off")
    p.add_argument("--ddim-steps", type=int, default=50, help="T, DDIM steps of the step-wise grid (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue an interrupted tune in --out")
    p.add_argument("--prior-preservation", action="store_true", help="dreambooth: prior-preservation loss")
    p.add_argument("--class-images", type=int, default=4, help="dreambooth: class images for the prior")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the UNet's activations in the backward pass (less memory, slower): DreamBooth's"
                        " weights, or the gradient reaching c_s / the TI vector")
    p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="dreambooth: train LoRA adapters of rank R on the UNet's attention instead of the whole UNet"
                        " (writes pytorch_lora_weights.safetensors)")
    p.add_argument("--accel", choices=ACCEL_MODES, default="eager",
                   help="how the c_s steps run: eager (default), compile (torch.compile),"
                        " graph (CUDA graph, UNet channels-last)")
    p.add_argument("--samples", type=int, default=2, help="sample images written to RUN_DIR/samples (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
