"""Architecture configs shipped with the package (no download).

``sd14`` (SD 1.4), ``sd21`` (SD 2.1), ``sdxl`` (Stable Diffusion XL base 1.0) and ``sd3``
(Stable Diffusion 3 medium): each component's config as diffusers/transformers write it in
the model repo (for SDXL, stabilityai/stable-diffusion-xl-base-1.0; for SD3,
stabilityai/stable-diffusion-3-medium-diffusers), less the provenance keys
(``_diffusers_version``, ``_name_or_path``, ``torch_dtype``, ``transformers_version``).

The UNet architectures (``sd14``, ``sd21``, ``sdxl``) have ``unet``, ``vae``, ``text_encoder``
and ``scheduler``; ``sdxl`` also has ``text_encoder_2`` (the OpenCLIP ViT-bigG/14 text tower, a
CLIPTextModelWithProjection). ``sd3`` has no ``unet``: its denoiser is ``transformer`` (an
SD3Transformer2DModel, the MMDiT), with ``vae`` (16 latent channels), ``text_encoder`` (CLIP
ViT-L/14) and ``text_encoder_2`` (OpenCLIP ViT-bigG/14), both CLIPTextModelWithProjection,
``text_encoder_3`` (the T5 v1.1 XXL encoder, a T5EncoderModel) and ``scheduler``
(FlowMatchEulerDiscreteScheduler, shift 3.0).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

ARCHITECTURES = ("sd14", "sd21", "sdxl", "sd3")
COMPONENTS = (
    "unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler",
)
_BASE = ("unet", "vae", "text_encoder", "scheduler")
_SD3 = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler")
_COMPONENTS_OF = {
    "sd14": _BASE, "sd21": _BASE, "sdxl": (*_BASE, "text_encoder_2"), "sd3": _SD3,
}


def load_config(architecture: str, component: str) -> dict[str, Any]:
    """The shipped diffusers/transformers config of one component of an architecture."""
    if component not in _COMPONENTS_OF.get(architecture, ()):
        raise ValueError(f"no config for {architecture}/{component}")
    text = resources.files(__name__).joinpath(architecture, f"{component}.json").read_text()
    config: dict[str, Any] = json.loads(text)
    return config
