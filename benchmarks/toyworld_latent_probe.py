"""How much of a subject's pattern and mark can a ToyWorld latent hold? Round trips through fresh VAEs.

    python -m benchmarks.toyworld_latent_probe --work WORK [--steps 600] [--variants f8c4 f8c8 f4c4]

A probe for issue 24 (the bundled VAE's round trip keeps the prompted pattern in 48% of
renders and the mark in 37%, so no UNet on its latents can follow them 80% of the time).
Each variant is a fresh AutoencoderKL trained with the `vae` stage's recipe
(:func:`benchmarks.toyworld_vae_probe.probe`: same seed, pool, loss and schedule, ``--steps``
at batch 16) on the rendered pool in ``WORK``: ``f8`` the bundle's factor 8 (64x64 -> 8x8,
four levels), ``f4`` factor 4 (-> 16x16, three levels: four times the latent cells, and
a UNet four times the cost per step), ``cN`` N latent channels. Each round-trips the check's
patterned, marked renders (60, the detail check's objects and seeds) and the evaluation
subjects' photos; the detail classifier reads the round trips (pattern and mark following,
as ``benchmarks.toyworld check``) and the identity embedder scores the photos' round trips
against the other photos (the latent's identity ceiling). The bundled VAE is scored beside
them; equal steps, so the comparison is between the variants trained here, a short budget
on this CPU, not what each would reach. Writes
``benchmarks/results/toyworld-model/latent-probe.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.toyworld_vae_probe import probe
from hifi.io.images import atomic_path, write_json
from hifi.toyworld.subjects import SUBJECTS, subject_photos
from hifi.toyworld.world import caption, render
from hifi_backends.toy.models import vae_config
from hifi_backends.toy.quality import detail_hits, detail_objects, wilson

RESULTS = Path(__file__).parent / "results" / "toyworld-model"


def variant_config(name: str) -> dict[str, Any]:
    """``fFcC``: the `vae` stage's architecture at the CPU recipe's width, factor F (8: four levels, the
    bundle's; 4: its first three, 16x16 latents), C latent channels."""
    factor, channels = int(name[1 : name.index("c")]), int(name[name.index("c") + 1 :])
    if factor not in (4, 8):
        raise ValueError(f"variant {name!r}: factor 4 or 8")
    return vae_config((16, 32, 64, 64)[: 3 if factor == 4 else 4], channels)


def detail_renders(samples: int = 60, seed: int = 2) -> tuple[torch.Tensor, list[Any]]:
    """The detail check's objects and render seeds (:func:`hifi_backends.toy.quality.detail_following`)."""
    objects = detail_objects(samples, seed)
    images = torch.stack([torch.from_numpy(render(o, seed=seed * 100_000 + i)[0]).permute(2, 0, 1).float()
                          / 127.5 - 1.0 for i, o in enumerate(objects)])
    return images, objects


def score(vae: Any, renders: torch.Tensor, objects: list[Any], detail: Any, identity: Any) -> dict[str, Any]:
    """Pattern and mark following of the renders' round trips; identity of the photos' round trips."""
    def trip(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)

    hits = detail_hits(detail.read(trip(renders)), [o.look for o in objects])
    out: dict[str, Any] = {}
    for k in ("pattern", "mark"):
        n, h = len(hits[k]), int(sum(hits[k]))
        out[k] = {"rate": h / n, "ci95": list(wilson(h, n)), "n": n}
    per_subject = {}
    for name in SUBJECTS:
        photos = torch.stack([torch.from_numpy(p[0]).permute(2, 0, 1).float() / 127.5 - 1
                              for p in subject_photos(name)])
        a = torch.nn.functional.normalize(identity.embed(trip(photos)), dim=-1)
        b = torch.nn.functional.normalize(identity.embed(photos), dim=-1)
        sims = a @ b.T
        per_subject[name] = float(sims[~torch.eye(len(sims), dtype=torch.bool)].mean())
    out["identity"] = float(np.mean(list(per_subject.values())))
    out["identity_per_subject"] = per_subject
    out["mse"] = float(torch.nn.functional.mse_loss(trip(renders), renders))
    with torch.no_grad():
        out["latent"] = "x".join(str(d) for d in vae.encode(renders[:1]).latent_dist.mean.shape[1:][::-1])
    return out


def main(argv: list[str] | None = None) -> int:
    from diffusers import AutoencoderKL

    from hifi_backends.toy.backend import BUNDLE
    from hifi_backends.toy.perception import build_toy_detail, build_toy_identity

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a training work folder (holds pool.npz)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--variants", nargs="+", default=["f8c4", "f4c4"])
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    renders, objects = detail_renders()
    detail, identity = build_toy_detail(), build_toy_identity()
    rows: dict[str, Any] = {}
    rows["bundled (f8c4, GPU recipe)"] = score(AutoencoderKL.from_pretrained(BUNDLE / "vae").eval(), renders,
                                               objects, detail, identity)
    print(json.dumps({k: rows["bundled (f8c4, GPU recipe)"][k] for k in ("pattern", "mark", "identity")}))
    for name in args.variants:
        trained = probe(Path(args.work), 0, args.steps, config=variant_config(name))
        rows[name] = {**score(trained["vae"], renders, objects, detail, identity), "seconds": trained["seconds"],
                      "parameters": trained["parameters"]}
        print(json.dumps({name: {k: rows[name][k] for k in ("pattern", "mark", "identity", "seconds")}}), flush=True)
    report = {"steps": args.steps, "batch": 16, "renders": len(objects), "example_prompt": caption(objects[0]),
              "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "latent-probe.json", report)
    lines = ["# How much pattern and mark a latent holds (fresh VAEs, equal steps)", "",
             f"Fresh VAEs trained {args.steps} steps at batch 16 (the `vae` stage's recipe) on this CPU; the bundled"
             " one beside them. Round trips of 60 patterned, marked renders read by the detail classifier"
             " (95% Wilson intervals), and the subjects' photos' round trips against their other photos (identity).",
             "", "| VAE | latent | pattern | mark | identity ceiling | image MSE | train s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['latent']} | {r['pattern']['rate']:.0%} [{r['pattern']['ci95'][0]:.0%},"
                     f" {r['pattern']['ci95'][1]:.0%}] | {r['mark']['rate']:.0%} [{r['mark']['ci95'][0]:.0%},"
                     f" {r['mark']['ci95'][1]:.0%}] | {r['identity']:.3f} | {r['mse']:.4f} |"
                     f" {r.get('seconds', 'n/a')} |")
    with atomic_path(RESULTS / "latent-probe.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
