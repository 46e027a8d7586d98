"""Does ToyWorld's VAE keep an object's class through a round trip with more latent room?

    python -m benchmarks.toyworld_vae_probe --work WORK [--steps 500] [--channels 4 8]

A probe for issue #8 (the generated class is found 27% of the time; a round trip through
the bundled VAE alone keeps 55% of the classes of renders). For each latent width it
trains a fresh AutoencoderKL with the `vae` stage's recipe (same seed, data, loss and
schedule, shortened to ``--steps``) on the rendered pool in ``WORK`` (from
`python -m hifi_backends.toy.train`), then round-trips 240 held-out renders and scores
them with the bundled ToyCLIP, as the prompt-following check does; the bundled VAE
(4 channels, 2,600 steps) is scored on the same renders. Equal steps, so the comparison
is between the widths trained here. Writes
``benchmarks/results/toyworld-model/vae-probe.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hifi.io import write_json
from hifi.toyworld.world import render, sample_object
from hifi_backends.toy.models import vae_config
from hifi_backends.toy.perception import load_toyclip
from hifi_backends.toy.quality import classify
from hifi_backends.toy.train import Pool, _schedule

RESULTS = Path(__file__).parent / "results" / "toyworld-model"


def held_out(count: int = 240, seed: int = 77) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    objects = [sample_object(rng) for _ in range(count)]
    rendered = [render(o, seed=seed * 1000 + i) for i, o in enumerate(objects)]
    images = torch.stack([torch.from_numpy(r[0]).permute(2, 0, 1).float() / 127.5 - 1.0 for r in rendered])
    masks = torch.stack([torch.from_numpy(np.asarray(r[1])).bool() for r in rendered])
    return images, masks, [o.look.cls for o in objects], [o.scene for o in objects]


def probe(work: Path, channels: int, steps: int, batch: int = 16, seed: int = 0) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    pool = Pool(work)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**{**vae_config(), "latent_channels": channels})
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    began = time.time()
    for i in range(steps):  # the `vae` stage's step (train.stage_vae)
        _schedule(opt, 1e-3, i, steps)
        x = pool.batch(torch.randint(len(pool), (batch,), generator=gen)) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-4 * kl
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
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    images, masks, classes, scenes = held_out()
    clip = load_toyclip()
    _, render_classes = classify(clip, images, classes, scenes)
    report: dict[str, Any] = {"steps": args.steps, "held_out": len(classes),
                              "renders_class_accuracy": _accuracy(render_classes, classes), "widths": {}}
    from diffusers import AutoencoderKL

    from hifi_backends.toy.backend import BUNDLE

    bundled = {"vae": AutoencoderKL.from_pretrained(BUNDLE / "vae").eval(), "seconds": None, "parameters": None}
    for c in ["bundled", *args.channels]:
        trained = bundled if c == "bundled" else probe(Path(args.work), int(c), args.steps)
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "vae-probe.json", report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
