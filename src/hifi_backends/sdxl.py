"""Stable Diffusion XL backends: ``sdxl`` (fp32), ``sdxl-fp16`` (fp16/bf16) and ``tiny-sdxl`` (tests).

The same :class:`~hifi_backends.diffusers_backend.DiffusersBackend` as SD 1.x, fed a second
text encoder: the algorithms see SDXL's two encoders, pooled embedding and time ids only
as a :class:`~hifi.kernels.condition.Condition`. ``random:sdxl`` builds the full base-1.0
architecture with random weights from configs shipped in the package; ``tiny-sdxl`` is a
random SDXL of the sizes diffusers' own SDXL pipeline tests use, on 32x32 images.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from hifi.errors import HifiError
from hifi.registry import default_device
from hifi_backends.configs import load_config
from hifi_backends.diffusers_backend import DiffusersBackend
from hifi_backends.stable_diffusion import (
    check_attention,
    half_precision,
    hub_kwargs,
    loading_error,
    resolve_model,
    set_attention,
)
from hifi_backends.tiny import TINY_MAX_LENGTH, tiny_clip_config, tiny_vae
from hifi_backends.tokenizer import build_clip_tokenizer

MODEL_ENV = "HIFI_SDXL_MODEL"
FOLDERS = "unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ and scheduler/"

__all__ = ["build_random_sdxl", "build_sdxl_backend", "build_sdxl_fp16_backend", "build_tiny_sdxl_backend",
           "load_sdxl"]


def _text_config(component: str) -> CLIPTextConfig:
    config = {k: v for k, v in load_config("sdxl", component).items() if k not in ("architectures", "model_type")}
    return CLIPTextConfig(**config)


def build_random_sdxl(
    *, seed: int = 0, sample_size: int | None = None, name: str = "sdxl", device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> DiffusersBackend:
    """SDXL base 1.0's architecture with random weights (seeded), no download.

    ``sample_size`` overrides the UNet's latent side (128: 1024x1024 images; e.g. 8 for 64x64
    on a CPU). Both tokenizers are built locally (byte-level, CLIP format, 77 positions).
    """
    unet_config = load_config("sdxl", "unet")
    if sample_size is not None:
        unet_config["sample_size"] = sample_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(load_config("sdxl", "vae"))
        text_encoder = CLIPTextModel(_text_config("text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config("text_encoder_2"))
    return DiffusersBackend(
        name=name, model_id=f"random:sdxl:{seed}", unet=unet, vae=vae,
        text_encoder=text_encoder, tokenizer=build_clip_tokenizer(model_max_length=77),
        text_encoder_2=text_encoder_2, tokenizer_2=build_clip_tokenizer(model_max_length=77),
        scheduler_config=load_config("sdxl", "scheduler"), force_zeros_for_empty_prompt=True,
        device=device or default_device(), dtype=dtype,
    )


def _load_components(model: str, dtype: torch.dtype) -> dict[str, Any]:
    """The seven components of an SDXL folder, and its pipeline's ``force_zeros_for_empty_prompt``."""
    kwargs = hub_kwargs()
    weights = {"torch_dtype": dtype, "low_cpu_mem_usage": False, **kwargs}
    try:
        pipeline_config = dict(StableDiffusionXLPipeline.load_config(model, **kwargs))
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(model, subfolder="unet", **weights),
            "vae": AutoencoderKL.from_pretrained(model, subfolder="vae", **weights),
            "text_encoder": CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype, **kwargs),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                model, subfolder="text_encoder_2", dtype=dtype, **kwargs
            ),
            "tokenizer": CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kwargs),
            "tokenizer_2": CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2", **kwargs),
            "scheduler_config": dict(DDIMScheduler.load_config(model, subfolder="scheduler", **kwargs)),
        }
    except (OSError, ValueError) as err:
        raise loading_error(model, err, MODEL_ENV) from err
    if pipeline_config.get("requires_aesthetics_score"):
        raise HifiError(f"{model!r} is an SDXL refiner (it needs an aesthetic score); hifi runs the SDXL base model")
    return {**parts, "force_zeros_for_empty_prompt": bool(pipeline_config.get("force_zeros_for_empty_prompt", True))}


def load_sdxl(
    model: str | None = None,
    *,
    name: str = "sdxl",
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    attention: str = "sdpa",
    seed: int = 0,
    channels_last: bool = False,
) -> DiffusersBackend:
    """SDXL base from a diffusers folder or hub id, or ``random:sdxl[:SEED]`` (random weights).

    ``attention`` and ``channels_last`` as for :func:`hifi_backends.stable_diffusion.load_stable_diffusion`.
    """
    check_attention(attention)
    model = resolve_model(model, env=MODEL_ENV, example="stabilityai/stable-diffusion-xl-base-1.0", folders=FOLDERS)
    if model.startswith("random:"):
        spec = model.split(":")
        if spec[1] != "sdxl" or len(spec) > 3 or (len(spec) == 3 and not spec[2].isdigit()):
            raise HifiError(f"model {model!r}: the random SDXL model is random:sdxl or random:sdxl:SEED")
        backend = build_random_sdxl(seed=int(spec[2]) if len(spec) > 2 else seed, name=name, device=device,
                                    dtype=dtype)
    else:
        backend = DiffusersBackend(name=name, model_id=model, device=device or default_device(), dtype=dtype,
                                   **_load_components(model, dtype))
    set_attention(backend, attention)
    if channels_last:
        backend.set_channels_last()
    return backend


def build_sdxl_backend(*, model: str | None = None, seed: int = 0, device: str | None = None) -> DiffusersBackend:
    """Registry entry ``sdxl``: full precision, PyTorch SDPA attention."""
    return load_sdxl(model, name="sdxl", device=device, seed=seed)


def build_sdxl_fp16_backend(
    *,
    model: str | None = None,
    seed: int = 0,
    device: str | None = None,
    precision: str = "fp16",
    attention: str = "sdpa",
    channels_last: bool = False,
) -> DiffusersBackend:
    """Registry entry ``sdxl-fp16``: half precision (``fp16`` or ``bf16``; in fp16 the VAE stays float32)."""
    return load_sdxl(model, name="sdxl-fp16", device=device, dtype=half_precision(precision), attention=attention,
                     seed=seed, channels_last=channels_last)


def build_tiny_sdxl_backend(
    *, model: str | None = None, seed: int = 0, device: str | None = None
) -> DiffusersBackend:
    """A random tiny SDXL: two text encoders (32 wide each, the second projected), a text-time UNet,
    32x32 images, 8x8x4 latents, L = 24. Nothing is downloaded; ``seed`` fixes the weights."""
    if model:
        raise HifiError("the tiny-sdxl backend has random weights and loads no model; drop --model")
    tokenizer, tokenizer_2 = (build_clip_tokenizer(model_max_length=TINY_MAX_LENGTH) for _ in range(2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the 32-wide pooled embedding
            cross_attention_dim=64,  # the two 32-wide sequences side by side
            norm_num_groups=1,
        )
        vae = tiny_vae()
        text_encoder = CLIPTextModel(tiny_clip_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer_2))
    return DiffusersBackend(
        name="tiny-sdxl", model_id=f"random:tiny-sdxl:{seed}", unet=unet, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        scheduler_config=load_config("sdxl", "scheduler"), force_zeros_for_empty_prompt=True,
        device=device or "cpu",
    )
