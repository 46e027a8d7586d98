"""Architecture configs shipped with the package (no download).

``sd14`` (SD 1.4), ``sd21`` (SD 2.1) and ``sdxl`` (Stable Diffusion XL base 1.0): each
component's config as diffusers/transformers write it in the model repo (for SDXL,
stabilityai/stable-diffusion-xl-base-1.0), less the provenance keys (``_diffusers_version``,
``_name_or_path``, ``torch_dtype``, ``transformers_version``). Every architecture has
``unet``, ``vae``, ``text_encoder`` and ``scheduler``; only ``sdxl`` also has
``text_encoder_2`` (the OpenCLIP ViT-bigG/14 text tower, a CLIPTextModelWithProjection).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

ARCHITECTURES = ("sd14", "sd21", "sdxl")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")
_BASE = ("unet", "vae", "text_encoder", "scheduler")
_COMPONENTS_OF = {"sd14": _BASE, "sd21": _BASE, "sdxl": (*_BASE, "text_encoder_2")}


def load_config(architecture: str, component: str) -> dict[str, Any]:
    """The shipped diffusers/transformers config of one component of an architecture."""
    if component not in _COMPONENTS_OF.get(architecture, ()):
        raise ValueError(f"no config for {architecture}/{component}")
    text = resources.files(__name__).joinpath(architecture, f"{component}.json").read_text()
    config: dict[str, Any] = json.loads(text)
    return config
