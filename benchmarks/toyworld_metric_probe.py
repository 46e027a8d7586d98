"""Probe: would a metric ToyCLIP that has seen VAE round trips find more classes in generations?

    python -m benchmarks.toyworld_metric_probe --work WORK --out benchmarks/results/toyworld-model

The bundle's prompt-following check scores classes with a metric ToyCLIP trained on crisp
renders; through one VAE round trip those renders keep only 55% of their classes by it,
so that is a ceiling on any generation. This probe fine-tunes a copy of the metric's image
tower (text tower frozen) on half renders, half their round trips through the work
folder's VAE, with the swapped-word loss of the ``clip_metric`` stage (each image against
"a <class> <its scene>" for every class and "a <its class> <scene>" for every scene), then
runs the same check (renders, round trips, generations) with that copy. If generations
gain little while the round-trip ceiling rises, the UNet, not the metric, is the limit.
Writes ``metric-probe.json``; the bundle is not changed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hifi.errors import HifiError
from hifi.io.images import write_json
from hifi.registry import load_backend
from hifi.toyworld.world import CLASSES, SCENES

__all__ = ["probe_round_trip_metric"]


def probe_round_trip_metric(work: str | Path, *, metric: str | None = None, generator: str | None = None,
                            images: int = 6000, steps: int = 300, samples: int = 60,
                            seed: int = 0) -> dict[str, Any]:
    """Fine-tune the metric's image tower on renders and VAE round trips; check before and after."""
    from diffusers import AutoencoderKL

    from hifi_backends.toy.perception import load_toyclip
    from hifi_backends.toy.quality import prompt_following
    from hifi_backends.toy.training.data import Pool
    from hifi_backends.toy.training.towers import _token_ids

    work = Path(work)
    began = time.time()
    backend = load_backend("toy", model=generator)  # first, so a bad folder fails before the decoding
    clip = load_toyclip(metric)
    pool = Pool(work)
    count = min(images, len(pool))
    vae = AutoencoderKL.from_pretrained(work / "vae_final", low_cpu_mem_usage=False).eval()
    with torch.no_grad():
        trips = torch.cat([
            (vae.decode(vae.encode(pool.batch(torch.arange(a, min(a + 250, count))) * 2 - 1).latent_dist.mean)
             .sample.clamp(-1, 1) + 1) / 2
            for a in range(0, count, 250)
        ])
    before = prompt_following(backend, clip, samples=samples, num_steps=25)
    scenes = list(SCENES)
    with torch.no_grad():
        grid = F.normalize(clip.text_model(input_ids=_token_ids(
            clip.tokenizer, [f"a {c} {SCENES[s]}" for c in CLASSES for s in scenes])).text_embeds, dim=-1)
    tower = clip.image_tower.train().requires_grad_(True)
    pool_class = torch.tensor([CLASSES.index(o.look.cls) for o in pool.objects[:count]])
    pool_scene = torch.tensor([scenes.index(o.scene) for o in pool.objects[:count]])
    opt = torch.optim.AdamW(tower.parameters(), lr=3e-4, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(64)
    for _ in range(steps):
        index = torch.randint(count, (64,), generator=gen)
        use_trip = (torch.rand(64, generator=gen) < 0.5)[:, None, None, None]
        emb = F.normalize(tower(torch.where(use_trip, trips[index], pool.batch(index))), dim=-1)
        sim = (30.0 * emb @ grid.T).view(-1, len(CLASSES), len(scenes))
        cls, scene = pool_class[index], pool_scene[index]
        loss = F.cross_entropy(sim[rows, :, scene], cls) + F.cross_entropy(sim[rows, cls, :], scene)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tower.eval().requires_grad_(False)
    after = prompt_following(backend, clip, samples=samples, num_steps=25)

    def summary(report: Any) -> dict[str, float]:
        return {k: v for k, v in report.as_dict().items() if k != "rows"}

    return {"metric": metric or "bundled", "generator": generator or "bundled", "images": count, "steps": steps,
            "before": summary(before), "after": summary(after), "seconds": round(time.time() - began, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.toyworld_metric_probe", description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="a ToyWorld training work folder (pool.npz, vae_final)")
    p.add_argument("--metric", default=None, help="ToyWorld folder whose metric ToyCLIP is copied (default: bundle)")
    p.add_argument("--generator", default=None, help="ToyWorld folder that generates (default: the bundle)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="benchmarks/results/toyworld-model")
    args = p.parse_args(argv)
    if not (Path(args.work) / "vae_final").is_dir():
        p.error(f"{args.work} has no vae_final/: give the work folder of `python -m hifi_backends.toy.train`")
    try:
        result = probe_round_trip_metric(args.work, metric=args.metric, generator=args.generator, steps=args.steps)
    except HifiError as err:  # e.g. a --metric or --generator folder that is not a ToyWorld model
        print(f"toyworld_metric_probe: error: {err}", file=sys.stderr)
        return 2
    write_json(Path(args.out) / "metric-probe.json", result)
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
