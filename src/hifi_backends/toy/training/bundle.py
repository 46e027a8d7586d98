"""The folders training writes: a model's (diffusers' or a small network's) and the bundle (stage ``bundle``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import torch

from hifi.io.images import atomic_path, write_json
from hifi_backends.toy.training.settings import TrainSettings

SMALL_MODELS = {"identity": "identity", "segmenter": "segmenter", "detail": "detail"}
"""Small-model stages whose output a bundle holds as a folder of the same name (beside ToyCLIP's image
tower): what :func:`stage_bundle` writes and :func:`~hifi_backends.toy.training.pipeline.install` takes."""


def _save_model_dir(model: Any, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _save_small(net: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    config = dict(cast(dict[str, Any], net.config))
    write_json(folder / "config.json", config)


def _save_small_half(source: Path, dest: Path) -> None:
    """A small model's folder (``model.safetensors``, ``config.json``) written to ``dest`` in float16."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True)
    save_file({k: v.half() for k, v in load_file(str(source / "model.safetensors")).items()},
              str(dest / "model.safetensors"))
    shutil.copy(source / "config.json", dest / "config.json")


def stage_bundle(work: Path, out: Path, s: TrainSettings, report: dict[str, Any]) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from hifi_backends.configs import load_config

    scale = torch.load(work / "latents.pt", weights_only=True)["scaling_factor"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vae = AutoencoderKL.from_pretrained(work / "vae_final", low_cpu_mem_usage=False)
    vae.register_to_config(scaling_factor=scale)
    half = {"safe_serialization": True}
    vae.half().save_pretrained(tmp / "vae", **half)
    UNet2DConditionModel.from_pretrained(work / "unet").half().save_pretrained(tmp / "unet", **half)
    # The text encoder stays float32: transformers loads a model in its stored dtype and diffusers in
    # float32, so a float16 text encoder fails a stock StableDiffusionPipeline's first step (0.4 MB more).
    CLIPTextModel.from_pretrained(work / "text_encoder").float().save_pretrained(tmp / "text_encoder", **half)
    (tmp / "toyclip").mkdir()
    CLIPTextModelWithProjection.from_pretrained(work / "toyclip_metric" / "text").half().save_pretrained(
        tmp / "toyclip" / "text", **half)
    CLIPTokenizer.from_pretrained(work / "tokenizer").save_pretrained(tmp / "tokenizer")
    scheduler = load_config("sd14", "scheduler")
    write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
    for name, dest in (*SMALL_MODELS.items(), ("toyclip_metric/image", "toyclip/image")):
        _save_small_half(work / name, tmp / dest)
    write_json(tmp / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    })
    write_json(tmp / "training.json", report)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
