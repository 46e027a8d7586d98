"""Train ToyWorld's models from scratch and write the bundle: ``python -m hifi_backends.toy.train``.

The command line of :mod:`hifi_backends.toy.training` (whose docstring says what each stage
trains): the whole recipe (``--preset``, ``--settings``), only some stages in a work folder
(``--stages``, also how :func:`~hifi_backends.toy.training.pipeline.train_all` runs its worker
processes), a bundle's UNet trained on (``--finetune``), or a small model trained after the bundle put
into it (``--install``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import attrs
import torch

from hifi_backends.toy.training.pipeline import STAGES, finetune, install, run_stage, train_all
from hifi_backends.toy.training.settings import TrainSettings, _device, settings_over

__all__ = ["main"]


def _settings(args: argparse.Namespace) -> TrainSettings:
    """The settings a command line asks for: a preset (or a bundle's own), then --settings, --device."""
    if args.finetune:
        record = Path(args.finetune) / "training.json"
        if not record.exists():
            raise ValueError(f"{args.finetune} is not a ToyWorld bundle (no training.json)")
        saved = json.loads(record.read_text()).get("settings")
        if not isinstance(saved, dict):
            raise ValueError(f"{record} holds no training settings: is {args.finetune} a ToyWorld bundle?")
        known = {f.name for f in attrs.fields(TrainSettings)}
        s = TrainSettings(**{k: v for k, v in saved.items() if k in known})
    else:
        s = TrainSettings.quick() if args.quick else TrainSettings.gpu() if args.preset == "gpu" else TrainSettings()
        s = attrs.evolve(s, seed=args.seed)
    if args.settings:
        s = settings_over(s, args.settings)
    if args.device:
        s = attrs.evolve(s, device=args.device)
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hifi_backends.toy.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="bundle folder to write (default: the package's bundle)")
    p.add_argument("--work", default="toyworld-work", help="folder for the pool, checkpoints and stage outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny step counts (a smoke test, not a model)")
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: the 2-core recipe (default, about 90 minutes); gpu: TrainSettings.gpu(), the wider"
                        " VAE and UNet fitted to about eight minutes of an H100")
    p.add_argument("--device", default=None, help="where the VAE and UNet stages run (default: the preset's)")
    p.add_argument("--stages", default=None,
                   help="only these stages (comma-separated, e.g. the small models for the GPU recipe:"
                        " render,clip,identity,segmenter,clip_metric,clip_unet), in WORK, one thread; no bundle")
    p.add_argument("--settings", default=None,
                   help="a JSON object of TrainSettings fields over the preset's (with --finetune: over the"
                        ' bundle\'s own), e.g. \'{"unet_seconds": 3300, "unet_batch": 128}\'')
    p.add_argument("--finetune", default=None, metavar="BUNDLE",
                   help="go on training the UNet of this ToyWorld bundle (its other models copied); the new"
                        " bundle goes to --out")
    p.add_argument("--install", default=None, metavar="STAGE",
                   help="put a finished small-model stage of WORK (e.g. detail) into the bundle --out (default:"
                        " the package's), recorded in its training.json")
    args = p.parse_args(argv)
    if args.install:
        from hifi_backends.toy.backend import BUNDLE

        try:
            install(args.work, args.out or BUNDLE, args.install)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{args.install} installed in {args.out or BUNDLE}")
        return 0
    try:
        s = _settings(args)
        _device(s)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = args.stages.split(",") if args.stages else []
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        print(f"error: unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}", file=sys.stderr)
        return 2
    if names:  # a worker process started by train_all, or the small models for the GPU recipe
        torch.set_num_threads(int(os.environ.get("HIFI_TOY_THREADS", "1")))
        Path(args.work).mkdir(parents=True, exist_ok=True)
        for name in names:
            run_stage(name, Path(args.work), s)
        return 0
    from hifi_backends.toy.backend import BUNDLE

    if args.finetune:
        try:
            report = finetune(args.finetune, args.out or BUNDLE, args.work, s)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"bundle written to {args.out or BUNDLE} in {report['wall_seconds_total'] / 60:.1f} min")
        return 0
    report = train_all(args.out or BUNDLE, args.work, s)
    print(f"bundle written to {args.out or BUNDLE} in {report['wall_seconds_total'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
