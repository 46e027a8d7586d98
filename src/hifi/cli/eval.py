"""``hifi eval``: the DreamBooth protocol, one method (a Table 1 / Table 2 row) per call.

Scales out with torchrun: ``torchrun --nproc-per-node K -m hifi eval ...`` shards the
subjects over the ranks (gloo on CPUs, NCCL on GPUs) and rank 0 merges the tables.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import torch.distributed as dist

from hifi.algorithms.reference import ReferenceSettings
from hifi.cli.common import add_backend_flags, backend_from_args
from hifi.execution.fastpath import ACCEL_MODES
from hifi.io.images import check_writable
from hifi.protocols.denoiser import DenoiserBackend
from hifi.workflows.checks import check_finite, check_seeds, check_step_count
from hifi.workflows.evaluation import METHODS, EvalSettings, Scorers, evaluate, load_dreambooth, summary_markdown


def _distributed() -> tuple[int, int, str | None]:
    """(rank, world size, device) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return dist.get_rank(), world, (f"cuda:{local}" if use_cuda else None)


def metric_embedders(args: argparse.Namespace) -> tuple[Any, Any]:
    """The DINO-role and CLIP-role embedders: the flags', else the backend's own, else DINO and CLIP."""
    from hifi.perception.registry import load_embedder
    from hifi.registry import backend_perception_defaults

    prefs = backend_perception_defaults(args.backend or "tiny")
    identity = args.identity_embedder or prefs.get("embedder", "dino")
    clip = args.clip_embedder or prefs.get("clip", "clip")
    # A backend's own perception models load from the backend's folder when --model names one.
    own = set(prefs.values())
    identity_model = args.dino_model or (args.model if identity in own else None)
    clip_model = args.clip_model or (args.model if clip in own else None)
    return (load_embedder(identity, model=identity_model, device=args.device),
            load_embedder(clip, model=clip_model, device=args.device))


def run(args: argparse.Namespace) -> int:
    rank, world, device = _distributed()
    if device and not args.device:
        args.device = device
    check_writable(args.out)  # before any model loads
    check_finite({"--lr": args.lr})
    check_seeds(args.seed)
    dataset = load_dreambooth(args.dataset)
    settings = EvalSettings(
        method=args.method,
        subjects=tuple(s for s in (args.subjects or "").split(",") if s),
        prompts=args.prompts, images_per_prompt=args.images_per_prompt, steps=args.steps,
        stepwise_steps=args.stepwise_steps, num_steps=args.ddim_steps, seed=args.seed, masks=args.masks,
        learning_rates=((METHODS[args.method].lr_key, args.lr),) if args.lr else (), accel=args.accel,
        batch_size=args.batch_size,
        reference=ReferenceSettings(num_steps=args.ddim_steps, t_start=args.t_start, t_end=args.t_end,
                                    phi_steps=args.phi_steps),
    )
    if METHODS[args.method].reference:
        settings.reference.check()  # the guided images come after the tunes: refuse their window first
    scorers = Scorers(*metric_embedders(args))
    first = [backend_from_args(args)]  # the first subject's backend: the step count is checked on its schedule
    check_step_count(args.ddim_steps, first[0].schedule.num_train_timesteps, "--ddim-steps")

    def backend_for() -> DenoiserBackend:
        return first.pop() if first else backend_from_args(args)

    def gather(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]] | None:
        if world == 1:
            return [rows]
        parts: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(rows, parts, dst=0)
        return parts

    try:
        summary = evaluate(dataset, backend_for, scorers, args.out, settings,
                           rank=rank, world_size=world, gather=gather, progress=not args.quiet and rank == 0)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if summary is not None:
        print(summary_markdown(summary))
        print(f"wrote {args.out}/{args.method}/summary.md, summary.json, scores.csv and a grid per subject")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="the DreamBooth protocol: tune, generate, DINO / CLIP-I / CLIP-T")
    p.add_argument("--dataset", required=True, help="a DreamBooth-layout folder (subject folders + prompts file)")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--method", default="hifi", choices=list(METHODS), help="the table row to run")
    add_backend_flags(p)
    p.add_argument("--subjects", default=None, help="comma-separated subject names (default: all 30)")
    p.add_argument("--prompts", type=_positive, default=None, help="first N prompts of each list (default: 25)")
    p.add_argument("--images-per-prompt", type=_positive, default=4)
    p.add_argument("--batch-size", type=_positive, default=4,
                   help="seeds of a prompt drawn and guided together (default 4; each image as if alone)")
    p.add_argument("--steps", type=int, default=None, help="tune steps (default: the method's)")
    p.add_argument("--lr", type=float, default=None, help="tuning learning rate (default: the method's mode's)")
    p.add_argument("--stepwise-steps", type=int, default=10)
    p.add_argument("--accel", choices=ACCEL_MODES, default="eager",
                   help="how the tunes' c_s steps run: eager, compile, graph (CUDA, UNet channels-last); same results")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masks", default="none", help="none, auto, or DIR with DIR/<subject>/<photo>.png masks")
    p.add_argument("--t-start", type=int, default=40)
    p.add_argument("--t-end", type=int, default=10)
    p.add_argument("--phi-steps", type=int, default=10)
    p.add_argument("--dino-model", default=None, help="DINO ViT-S/16 folder or hub id (HIFI_DINO_MODEL)")
    p.add_argument("--clip-model", default=None, help="CLIP folder or hub id, ViT-B/32 by default (HIFI_CLIP_MODEL)")
    p.add_argument("--identity-embedder", default=None,
                   help="embedder in DINO's role (default: the backend's own, e.g. toy-id for toy; else dino)")
    p.add_argument("--clip-embedder", default=None,
                   help="embedder in CLIP's role, with embed_text (default: the backend's own, else clip)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


