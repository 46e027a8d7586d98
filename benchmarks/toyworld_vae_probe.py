"""Does ToyWorld's VAE keep an object's class through a round trip with more latent room?

    python -m benchmarks.toyworld_vae_probe --work WORK [--steps 500] [--channels 4 8] [--edge-weight 1]
    python -m benchmarks.toyworld_vae_probe --work WORK --steps 1000 --from-bundle [--decoder-only]

A probe for issue #8 (the generated class is found 27% of the time; a round trip through
the bundled VAE alone keeps 55% of the classes of renders). For each latent width it
trains a fresh AutoencoderKL with the `vae` stage's recipe (same seed, data, loss and
schedule, shortened to ``--steps``) on the rendered pool in ``WORK`` (from
`python -m hifi_backends.toy.train`), then round-trips 240 held-out renders and scores
them with the bundled ToyCLIP, as the prompt-following check does; the bundled VAE
(4 channels, 2,600 steps) is scored on the same renders. Equal steps, so the comparison
is between the widths trained here. ``--from-bundle`` instead trains the bundled VAE
further with the `vae_detail` recipe (``--decoder-only``: the encoder, hence the latents
the UNet was trained on, frozen). Writes
``benchmarks/results/toyworld-model/vae-probe.json`` (a later run with the same
``--steps`` adds its rows; ``--edge-weight`` adds an L1 loss on image gradients).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hifi.io.images import write_json
from hifi.toyworld.world import render, sample_object
from hifi_backends.toy.models import vae_config
from hifi_backends.toy.perception import load_toyclip
from hifi_backends.toy.quality import classify
from hifi_backends.toy.training.data import Pool
from hifi_backends.toy.training.loop import _schedule

RESULTS = Path(__file__).parent / "results" / "toyworld-model"


def held_out(count: int = 240, seed: int = 77) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    objects = [sample_object(rng) for _ in range(count)]
    rendered = [render(o, seed=seed * 1000 + i) for i, o in enumerate(objects)]
    images = torch.stack([torch.from_numpy(r[0]).permute(2, 0, 1).float() / 127.5 - 1.0 for r in rendered])
    masks = torch.stack([torch.from_numpy(np.asarray(r[1])).bool() for r in rendered])
    return images, masks, [o.look.cls for o in objects], [o.scene for o in objects]


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def probe(work: Path, channels: int, steps: int, batch: int = 16, seed: int = 0, edge_weight: float = 0.0,
          init: Any | None = None, decoder_only: bool = False, config: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    """A fresh VAE with the `vae` stage's recipe; or, from ``init``, more steps of `vae_detail`'s.

    ``decoder_only`` freezes the encoder (the latents, so a UNet trained on them stays valid);
    ``config`` replaces the fresh VAE's architecture (default: :func:`vae_config` with ``channels``).
    """
    from diffusers import AutoencoderKL

    pool = Pool(work)
    torch.manual_seed(seed + 1)
    if init is None:
        vae = AutoencoderKL(**(config or vae_config(latent_channels=channels)))
    else:
        vae = init.train()
    lr = 1e-3 if init is None else 5e-4
    if decoder_only:
        for module in (vae.encoder, vae.quant_conv):
            module.requires_grad_(False)
    opt = torch.optim.AdamW([q for q in vae.parameters() if q.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    began = time.time()
    for i in range(steps):  # the `vae` stage's step (training.autoencoder.stage_vae), or `vae_detail`'s
        _schedule(opt, lr, i, steps, warmup=100 if init is None else 50)
        index = torch.randint(len(pool), (batch,), generator=gen)
        x = pool.batch(index) * 2 - 1
        weight = 1.0 if init is None else 1.0 + 4.0 * pool.masks[index].float()[:, None]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        err = recon - x
        loss = (weight * err.pow(2)).mean() + 0.5 * (weight * err.abs()).mean() + 1e-4 * kl
        if edge_weight > 0:  # outlines: L1 between the images' finite differences (no learned features)
            loss = loss + edge_weight * sum(
                F.l1_loss(a, b) for a, b in zip(image_gradients(recon), image_gradients(x), strict=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
    return {"vae": vae.eval(), "seconds": round(time.time() - began, 1),
            "parameters": sum(p.numel() for p in vae.parameters())}


def _accuracy(found: list[str], truth: list[str]) -> float:
    return float(np.mean([a == b for a, b in zip(found, truth, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="the training work folder (holds pool.npz)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--channels", type=int, nargs="+", default=[4, 8])
    p.add_argument("--edge-weight", type=float, default=0.0, help="add an L1 loss on image gradients")
    p.add_argument("--from-bundle", action="store_true",
                   help="instead: train the bundled VAE --steps more with the vae_detail recipe")
    p.add_argument("--decoder-only", action="store_true", help="with --from-bundle: the encoder stays frozen")
    p.add_argument("--save", default=None, help="write the last VAE trained here to this folder (diffusers format)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    images, masks, classes, scenes = held_out()
    clip = load_toyclip()
    _, render_classes = classify(clip, images, classes, scenes)
    out = RESULTS / "vae-probe.json"
    report: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"widths": {}}
    if report.get("steps", args.steps) != args.steps and not args.from_bundle:
        report = {"widths": {}}  # another step budget: start a new comparison
    if not args.from_bundle:  # "steps": the budget of the fresh VAEs; bundled+N rows name theirs
        report["steps"] = args.steps
    report.update(held_out=len(classes), renders_class_accuracy=_accuracy(render_classes, classes))
    from diffusers import AutoencoderKL

    from hifi_backends.toy.backend import BUNDLE

    bundled = {"vae": AutoencoderKL.from_pretrained(BUNDLE / "vae").eval(), "seconds": None, "parameters": None}
    more = f"bundled+{args.steps}{' decoder' if args.decoder_only else ''}"
    widths: list[str | int] = ["bundled", more] if args.from_bundle else ["bundled", *args.channels]
    for c in widths:
        if c == "bundled":
            trained = bundled
        elif args.from_bundle:
            trained = probe(Path(args.work), 4, args.steps, edge_weight=args.edge_weight,
                            init=AutoencoderKL.from_pretrained(BUNDLE / "vae"), decoder_only=args.decoder_only)
        else:
            trained = probe(Path(args.work), int(c), args.steps, edge_weight=args.edge_weight)
        if c != "bundled" and args.edge_weight > 0:
            c = f"{c}+edge{args.edge_weight:g}"
        with torch.no_grad():
            recon = trained["vae"].decode(trained["vae"].encode(images).latent_dist.mean).sample.clamp(-1, 1)
        found_scenes, found_classes = classify(clip, recon, classes, scenes)
        obj = masks[:, None].expand_as(images)
        report["widths"][str(c)] = {
            "class_accuracy": _accuracy(found_classes, classes), "scene_accuracy": _accuracy(found_scenes, scenes),
            "mse": float(F.mse_loss(recon, images)), "mse_object": float((recon - images).pow(2)[obj].mean()),
            "seconds": trained["seconds"], "parameters": trained["parameters"],
        }
        print(json.dumps({c: report["widths"][str(c)]}), flush=True)
        if args.save and c != "bundled":  # whole or not at all: written beside, then moved in
            tmp = Path(f"{args.save}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            trained["vae"].save_pretrained(tmp)
            shutil.rmtree(args.save, ignore_errors=True)
            tmp.rename(args.save)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
