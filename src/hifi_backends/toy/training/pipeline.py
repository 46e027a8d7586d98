"""The stages run in order: one stage (resumable), several in a worker process, all of them and the bundle
(:func:`train_all`), or a bundle's UNet trained on (:func:`finetune`); the machine a run went on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from hifi.io.images import write_json
from hifi_backends.toy.training.autoencoder import stage_vae, stage_vae_detail
from hifi_backends.toy.training.bundle import SMALL_MODELS, _save_small_half, stage_bundle
from hifi_backends.toy.training.data import stage_render
from hifi_backends.toy.training.denoiser import stage_latents, stage_unet
from hifi_backends.toy.training.settings import TrainSettings
from hifi_backends.toy.training.towers import (
    stage_clip,
    stage_clip_metric,
    stage_clip_unet,
    stage_detail,
    stage_identity,
    stage_segmenter,
)

STAGES = ("render", "vae", "vae_detail", "clip", "identity", "segmenter", "detail", "clip_metric", "clip_unet",
          "latents", "unet")
_DONE = {"render": "pool.json", "vae": "vae", "vae_detail": "vae_final", "clip": "toyclip", "identity": "identity",
         "segmenter": "segmenter", "detail": "detail", "clip_metric": "toyclip_metric", "clip_unet": "toyclip_unet",
         "latents": "latents.pt", "unet": "unet"}
_FUNCS: dict[str, Callable[[Path, TrainSettings], Any]] = {
    "vae": stage_vae, "vae_detail": stage_vae_detail, "clip": stage_clip, "identity": stage_identity,
    "segmenter": stage_segmenter, "detail": stage_detail,
    "clip_metric": stage_clip_metric, "clip_unet": stage_clip_unet,
    "latents": stage_latents, "unet": stage_unet,
}


def run_stage(name: str, work: Path, s: TrainSettings) -> dict[str, Any]:
    """Run one stage unless its output exists; its statistics go to ``work/<name>.json``."""
    stats_file = work / f"{name}.json"
    if (work / _DONE[name]).exists() and stats_file.exists():
        return json.loads(stats_file.read_text())
    began = time.time()
    if name == "render":
        stage_render(work, s)
        stats: dict[str, Any] = {"images": 2 * s.looks}
    else:
        stats = _FUNCS[name](work, s)
    stats["wall_seconds"] = round(time.time() - began, 1)
    write_json(stats_file, stats)
    return stats


def _subprocess_stages(names: list[str], work: Path, s: TrainSettings, threads: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HIFI_TOY_THREADS=str(threads))
    cmd = [sys.executable, "-m", "hifi_backends.toy.train", "--work", str(work), "--stages", ",".join(names),
           "--settings", json.dumps(attrs.asdict(s))]
    return subprocess.Popen(cmd, env=env)


def train_all(out: str | Path, work: str | Path, settings: TrainSettings | None = None,
              parallel: bool = True) -> dict[str, Any]:
    """Every stage, then the bundle in ``out``; returns the report written as ``training.json``."""
    s = settings or TrainSettings()
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    began = time.time()
    torch.set_num_threads(2)
    run_stage("render", work, s)
    # The clip_unet stage only when the UNet attends to its tower.
    stages = [n for n in STAGES if n != "clip_unet" or s.unet_text == "unet"]
    if parallel:
        small = ("clip", "identity", "segmenter", "detail", "clip_metric", "clip_unet")
        second: list[str] = [n for n in small if n in stages]
        procs = [_subprocess_stages(["vae", "vae_detail"], work, s, 1), _subprocess_stages(second, work, s, 1)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"a training process failed (exit codes {codes}); rerun to resume")
    for name in stages[1:]:
        run_stage(name, work, s)
    report = {
        "settings": attrs.asdict(s),
        "stages": {name: json.loads((work / f"{name}.json").read_text()) for name in stages},
        "wall_seconds_total": round(time.time() - began, 1),
        "torch": torch.__version__,
        "threads": 2,
        "machine": _machine(s.device),
    }
    stage_bundle(work, out, s, report)
    return report


def finetune(init: str | Path, out: str | Path, work: str | Path, settings: TrainSettings) -> dict[str, Any]:
    """Go on training the UNet of the bundle ``init``; write that bundle with the new UNet to ``out``.

    The pool is rendered into ``work`` if it is not there (``settings.looks``), encoded by the
    bundle's VAE at its scaling factor, and the UNet trained from the bundle's weights
    (``unet_lr``, ``unet_steps`` or ``unet_seconds``) with the bundle's text tower; every other
    model is the bundle's, copied. ``training.json`` keeps the bundle's own record under
    ``"init"``. ``out`` may be ``init``: it is replaced only once the new bundle is complete.
    """
    from diffusers import UNet2DConditionModel

    init, work, out = Path(init), Path(work), Path(out)
    s = attrs.evolve(settings, unet_init=str(init))
    missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "training.json") if not (init / n).exists()]
    if missing:
        raise ValueError(f"{init} is not a ToyWorld bundle (no {', '.join(missing)})")
    work.mkdir(parents=True, exist_ok=True)
    # The latents and UNet stages of a work folder belong to one starting bundle (finished stages
    # are skipped on a rerun): the bundle is known by its UNet's bytes, so a second round from
    # the new bundle, even at the same path, needs a fresh folder.
    digest = hashlib.sha256((init / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:16]
    record = work / "finetune.json"
    began_from = json.loads(record.read_text()).get("unet_sha256") if record.exists() else None
    held = [n for n in ("latents.json", "latents.pt", "unet.json", "unet.ckpt") if (work / n).exists()]
    if held and began_from != digest:
        raise ValueError(f"{work} holds the latents or UNet of another run ({', '.join(held)}), not of {init}:"
                         " use a fresh work folder")
    write_json(record, {"init": s.unet_init, "unet_sha256": digest})
    began = time.time()
    torch.set_num_threads(2)
    stages = {name: run_stage(name, work, s) for name in ("render", "latents", "unet")}
    report = {
        "settings": attrs.asdict(s),
        "stages": stages,
        "wall_seconds_total": round(time.time() - began, 1),
        "torch": torch.__version__,
        "machine": _machine(s.device),
        "note": f"fine-tune: the UNet of {init} trained further (settings.unet_*); every other model copied from it",
        "init_unet_sha256": digest,  # which UNet it went on from (a path alone may have held several)
        "init": json.loads((init / "training.json").read_text()),
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp)
    shutil.rmtree(tmp / "unet")
    UNet2DConditionModel.from_pretrained(work / "unet").half().save_pretrained(tmp / "unet", safe_serialization=True)
    write_json(tmp / "training.json", report)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report


def install(work: str | Path, bundle: str | Path, name: str) -> dict[str, Any]:
    """Put the finished small-model stage ``name`` of ``work`` into ``bundle`` (fp16), recorded in its
    ``training.json`` under ``"installed"`` with the stage's statistics and the machine it ran on.

    So a model trained after the bundle (the ``detail`` classifier) joins it without retraining the
    rest; a from-scratch run (:func:`train_all`) bundles every stage itself.
    """
    work, bundle = Path(work), Path(bundle)
    if name not in SMALL_MODELS:
        raise ValueError(f"--install takes one of {', '.join(SMALL_MODELS)}, not {name!r}")
    source, stats_file = work / name, work / f"{name}.json"
    if not (source / "model.safetensors").exists() or not stats_file.exists():
        raise ValueError(f"{work} holds no finished {name} stage: run --stages {name} there first")
    record_file = bundle / "training.json"
    if not record_file.exists():
        raise ValueError(f"{bundle} is not a ToyWorld bundle (no training.json)")
    dest = bundle / SMALL_MODELS[name]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_small_half(source, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    record = json.loads(record_file.read_text())
    entry = {"stage": json.loads(stats_file.read_text()), "machine": _machine("cpu"), "torch": torch.__version__,
             "work": str(work)}
    record.setdefault("installed", {})[name] = entry
    write_json(record_file, record)
    return entry


def _machine(device: str = "cpu") -> str:
    """The machine a run went on: its processor and cores, and the GPU's name where the stages ran on one."""
    import platform

    host = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{host}, {torch.cuda.get_device_name(torch.device(device))}"
    return host
