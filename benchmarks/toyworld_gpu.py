"""ToyWorld's GPU recipe in one call of a lent GPU machine (README, ToyWorld; issue: ToyWorld).

    python -m benchmarks.toyworld_gpu --carried DIR --work /tmp/tw --out OUT

``DIR`` holds the small models of a CPU run's work folder (``tokenizer``, ``toyclip_metric``,
``toyclip_unet``, ``identity``, ``segmenter``, ``detail`` and their ``<stage>.json``), or is a bundle
to take them from (:func:`carry_bundle`): they take minutes on the CPU and are not what limits the
generated class. This script then runs, on the GPU,
what does: the pool (re-rendered from the seed, ``looks`` of :meth:`TrainSettings.gpu`), the
VAE stages, the latents, and then the UNet of each variant side by side in two processes
(one GPU, launch-bound small models, so they share it well). Each variant becomes a bundle
(``bundle-<variant>.tar.gz`` in ``OUT``) and is checked at once on the GPU (``benchmarks.toyworld
check`` in ``check-<variant>/``: prompt, colour, pattern and mark following and the reference rows;
summed up in ``checks.json``). Before all that,
a smoke run of the same stages at quick sizes on the device, so a device bug costs seconds.

The step counts are fitted to wall-clock budgets (``vae_seconds``, ``unet_seconds``); what
each stage ran is in the bundle's ``training.json``, which reproduces it as plain settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import torch

from hifi.io.images import write_json
from hifi_backends.toy.training.bundle import SMALL_MODELS, _save_model_dir, stage_bundle
from hifi_backends.toy.training.pipeline import run_stage
from hifi_backends.toy.training.settings import TrainSettings, _device, settings_over

SMALL = ("tokenizer", "toyclip_metric", "toyclip_unet", "identity", "segmenter", "detail")
"""The folders carried from a CPU run (with their stages' ``.json``)."""
SMALL_STATS = ("clip", "clip_metric", "clip_unet", "identity", "segmenter", "detail")
SHARED = ("pool.npz", "pool.json", "render.json", "latents.pt", "latents.json", "vae_final", "vae.json",
          "vae_detail.json", *SMALL, *(f"{n}.json" for n in SMALL_STATS))
"""What the UNet variants' work folders link to in the main one."""
FROM_BUNDLE = {"tokenizer": "tokenizer", "toyclip": "toyclip_metric", **{f: n for n, f in SMALL_MODELS.items()}}
"""A bundle's small-model folders and the work folders :func:`carry_bundle` makes of them (and ``toyclip_unet``
from its ``text_encoder``)."""

VARIANTS: dict[str, dict[str, Any]] = {
    "u64": {"unet_width": (64, 128)},  # the CPU bundle's UNet shape
    "u128": {"unet_width": (128, 128)},  # twice the width at 8x8 latents
}


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` is a ToyWorld bundle (a diffusers pipeline folder) rather than a work folder."""
    return (folder / "model_index.json").exists() and (folder / "text_encoder").is_dir()


def carry_bundle(bundle: Path, work: Path) -> None:
    """The small models of a bundle, laid out as a work folder's (what :data:`SMALL` names), so that a
    new world is trained beside the bundle's tokenizer, text towers, identity embedder, segmenter and
    detail classifier without their CPU stages: ``toyclip_metric`` is the bundle's ``toyclip``;
    ``toyclip_unet/text`` holds the bundle's UNet text tower (``text_encoder``) inside a
    ``CLIPTextModelWithProjection`` whose projection, which the UNet stage never reads, is fresh;
    each stage's ``.json`` says where it came from."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    _require(bundle, FROM_BUNDLE)
    work.mkdir(parents=True, exist_ok=True)
    for src, dest in FROM_BUNDLE.items():
        shutil.copytree(bundle / src, work / dest, dirs_exist_ok=True)
    text = CLIPTextModel.from_pretrained(bundle / "text_encoder", torch_dtype=torch.float32)
    tower = CLIPTextModelWithProjection(text.config)
    tower.text_model.load_state_dict(text.state_dict())  # CLIPTextModel is the text transformer itself
    _save_model_dir(tower, work / "toyclip_unet" / "text")
    for name in SMALL_STATS:
        write_json(work / f"{name}.json", {"carried_from": str(bundle)})


def missing_small(carried: Path) -> list[str]:
    """The folders a bundle or a CPU run's work folder lacks of what :func:`_copy_small` takes."""
    return _lacking(carried, FROM_BUNDLE if is_bundle(carried) else SMALL)


def _lacking(folder: Path, names: Iterable[str]) -> list[str]:
    return [n for n in names if not (folder / n).is_dir()]


def _require(folder: Path, names: Iterable[str]) -> None:
    missing = _lacking(folder, names)
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)} (see this module's docstring)")


def _copy_small(carried: Path, work: Path) -> None:
    if is_bundle(carried):
        carry_bundle(carried, work)
        return
    _require(carried, SMALL)
    work.mkdir(parents=True, exist_ok=True)
    for name in SMALL:
        shutil.copytree(carried / name, work / name, dirs_exist_ok=True)
    for name in SMALL_STATS:
        if (carried / f"{name}.json").exists():
            shutil.copy(carried / f"{name}.json", work / f"{name}.json")


def carry_vae(folder: Path, work: Path) -> None:
    """Use a trained VAE (a diffusers ``AutoencoderKL`` folder, e.g. the bundle's ``vae``) instead of
    training one: it becomes ``work/vae_final`` (in fp32) and the VAE stages are skipped."""
    from diffusers import AutoencoderKL

    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a diffusers AutoencoderKL folder (no config.json)")
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, low_cpu_mem_usage=False)
    work.mkdir(parents=True, exist_ok=True)
    _save_model_dir(vae, work / "vae_final")  # written beside, then moved in
    for name in ("vae", "vae_detail"):
        write_json(work / f"{name}.json", {"carried_from": str(folder)})


def _unet_process(work: Path, s: TrainSettings, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "hifi_backends.toy.train", "--work", str(work), "--stages", "unet",
           "--settings", json.dumps(attrs.asdict(s))]
    with log.open("wb") as f:  # the child keeps its own handle
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, HIFI_TOY_THREADS="2"))


def _report(work: Path, s: TrainSettings, stages: list[str], *, vae_carried: bool = False) -> dict[str, Any]:
    ran = "render, latents and unet" if vae_carried else "render, vae, vae_detail, latents and unet"
    carried = "clip_metric, clip_unet, identity, segmenter, detail, tokenizer"
    carried += ", and the VAE (see vae.json)" if vae_carried else ""
    return {
        "settings": attrs.asdict(s),
        "stages": {n: json.loads((work / f"{n}.json").read_text()) for n in stages if (work / f"{n}.json").exists()},
        "torch": torch.__version__,
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "note": f"GPU recipe (TrainSettings.gpu(), benchmarks/toyworld_gpu.py): {ran} ran on {s.device!r}; the"
                f" models ({carried}) were carried from an earlier run or a bundle (their stages' records say"
                " which). The step counts each stage ran are in its 'steps' (fitted to vae_seconds / unet_seconds).",
    }


PART = 15 * 2**20
"""The device machine returns files of at most 16 MiB: a bundle's archive goes back in parts
``NAME.00``, ``NAME.01``, ... (``cat NAME.* > NAME`` joins them)."""


def _pack(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    data = archive.read_bytes()
    archive.unlink()
    for k in range(0, len(data), PART):
        archive.with_name(f"{archive.name}.{k // PART:02d}").write_bytes(data[k:k + PART])


def _check(bundle: Path, device: str, samples: int, out: Path | None = None) -> dict[str, Any]:
    """The model check of a bundle. With ``out``: ``benchmarks.toyworld check`` in full (prompt, colour and
    detail following, the reference rows: what a world is chosen by), written to ``out`` and summed up;
    without: prompt following alone (the smoke run's look that the bundle generates)."""
    from hifi_backends.toy.backend import build_toy_backend
    from hifi_backends.toy.perception import load_toyclip
    from hifi_backends.toy.quality import prompt_following

    began = time.time()
    if out is None:
        backend = build_toy_backend(model=str(bundle), device=device)
        report = prompt_following(backend, load_toyclip(str(bundle)), samples=samples, num_steps=25)
        summary = report.as_dict()
        summary.pop("rows", None)
    else:
        from benchmarks.toyworld import run_check

        result = run_check(out, model=str(bundle), samples=samples, device=device)
        rows, details = result["reference"]["rows"], result["detail_following"]
        summary = {"class": result["prompt_following"]["class_accuracy"],
                   "scene": result["prompt_following"]["scene_accuracy"],
                   "colour": result["colour_following"]["colour_accuracy"],
                   **{f"{k} ({where})": details[where][k]["rate"] for where in ("generated", "vae")
                      for k in ("pattern", "mark")},
                   **{f"identity ({row})": rows[row]["dino"]["mean"] for row in ("exact", "vae", "class")}}
    summary["seconds"] = round(time.time() - began, 1)
    return summary


def train_variants(carried: Path, work: Path, out: Path, settings: TrainSettings,
                   variants: dict[str, dict[str, Any]], *, samples: int = 60,
                   vae: Path | None = None) -> dict[str, Any]:
    """The shared stages in ``work``, then each variant's UNet beside the others, bundled and checked.

    With ``vae`` (a trained VAE's folder) the VAE stages are not run: see :func:`carry_vae`.
    """
    _copy_small(carried, work)
    results: dict[str, Any] = {"settings": attrs.asdict(settings), "variants": {},
                               "vae": str(vae) if vae else "trained here"}
    if vae is not None:
        carry_vae(vae, work)
    for name in ("render", "latents") if vae is not None else ("render", "vae", "vae_detail", "latents"):
        began = time.time()
        run_stage(name, work, settings)
        print(f"[toyworld_gpu] {name}: {time.time() - began:.1f} s", flush=True)
    procs = {}
    for v, overrides in variants.items():
        vwork = work.parent / f"{work.name}-{v}"
        vwork.mkdir(exist_ok=True)
        for name in SHARED:
            link = vwork / name
            if (work / name).exists() and not link.exists():
                link.symlink_to((work / name).resolve())
        vs = attrs.evolve(settings, **overrides)
        procs[v] = (vwork, vs, _unet_process(vwork, vs, out / f"unet-{v}.log"))
    for v, (vwork, vs, proc) in procs.items():
        code = proc.wait()
        entry: dict[str, Any] = {"overrides": {k: list(x) if isinstance(x, tuple) else x
                                               for k, x in variants[v].items()}, "exit": code}
        if code == 0:
            bundle = work.parent / f"bundle-{v}"
            stages = ["render", "vae", "vae_detail", *SMALL_STATS, "latents", "unet"]
            stage_bundle(vwork, bundle, vs, _report(vwork, vs, stages, vae_carried=vae is not None))
            _pack(bundle, out / f"bundle-{v}.tar.gz")
            entry["unet"] = json.loads((vwork / "unet.json").read_text())
            try:
                entry["check"] = _check(bundle, settings.device, samples, out / f"check-{v}")
            except Exception:  # keep the bundles whatever the check does
                entry["check_error"] = traceback.format_exc()
        results["variants"][v] = entry
        write_json(out / "checks.json", results)
        print(f"[toyworld_gpu] {v}: {json.dumps(entry)[:600]}", flush=True)
    return results


def smoke(carried: Path, work: Path, settings: TrainSettings, variants: dict[str, dict[str, Any]]) -> None:
    """The same stages at quick sizes on the device (seconds), so a device bug shows before the long run."""
    quick = TrainSettings.quick()
    base = attrs.evolve(settings, looks=64, vae_steps=3, vae_detail_steps=3, unet_steps=4, vae_batch=4, unet_batch=4,
                        vae_seconds=0.0, unet_seconds=0.0, render_workers=2, segmenter_steps=quick.segmenter_steps)
    _copy_small(carried, work)
    for name in ("render", "vae", "vae_detail", "latents"):
        run_stage(name, work, base)
    for v, overrides in variants.items():
        vs = attrs.evolve(base, **overrides)
        shutil.rmtree(work / "unet", ignore_errors=True)
        for stale in ("unet.json", "unet.ckpt"):
            (work / stale).unlink(missing_ok=True)
        run_stage("unet", work, vs)
        bundle = work / f"bundle-{v}"
        stage_bundle(work, bundle, vs, _report(work, vs, ["unet"]))
        check = _check(bundle, settings.device, samples=2)
        print(f"[toyworld_gpu] smoke {v}: ok ({check['seconds']} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.toyworld_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--carried", required=True,
                   help="the small models of a CPU run, or a bundle (e.g. src/hifi_backends/toy/bundle) to take them"
                        " from (see the module docstring)")
    p.add_argument("--work", default="/tmp/toyworld-gpu")
    p.add_argument("--out", required=True, help="bundles (tar.gz), checks.json and the UNet logs")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--settings", default=None, help="JSON of TrainSettings fields over TrainSettings.gpu()")
    p.add_argument("--samples", type=int, default=60)
    p.add_argument("--skip-smoke", action="store_true")
    p.add_argument("--vae", default=None,
                   help="a trained VAE folder (e.g. src/hifi_backends/toy/bundle/vae) instead of the VAE stages,"
                        " so a call's time goes to the UNet")
    args = p.parse_args(argv)
    try:
        settings = settings_over(attrs.evolve(TrainSettings.gpu(), device=args.device), args.settings or "{}")
    except ValueError as e:  # not JSON, an unknown field or a value of the wrong type
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    variants = {n: VARIANTS[n] for n in names}
    if args.vae and not (Path(args.vae) / "config.json").exists():
        print(f"error: --vae {args.vae} is not a diffusers AutoencoderKL folder (no config.json)", file=sys.stderr)
        return 2
    missing = missing_small(Path(args.carried))
    if missing:
        print(f"error: --carried {args.carried} lacks {', '.join(missing)} (see this module's docstring)",
              file=sys.stderr)
        return 2
    try:
        _device(settings)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_smoke:
        began = time.time()
        smoke(Path(args.carried), work.parent / f"{work.name}-smoke", settings, variants)
        print(f"[toyworld_gpu] smoke: {time.time() - began:.1f} s", flush=True)
    train_variants(Path(args.carried), work, out, settings, variants, samples=args.samples,
                   vae=Path(args.vae) if args.vae else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
