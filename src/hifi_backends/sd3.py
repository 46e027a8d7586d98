"""Stable Diffusion 3 backends: ``sd3`` (fp32), ``sd3-fp16`` (fp16/bf16) and ``tiny-sd3`` (tests).

The same :class:`~hifi_backends.diffusers_backend.DiffusersBackend`, fed an MMDiT
(``SD3Transformer2DModel``) in place of the UNet and a rectified-flow schedule
(``FlowMatchEulerDiscreteScheduler``, read as a :class:`~hifi.kernels.ddim.Schedule` of
``(alpha, sigma)`` levels). Its text condition is SD 3's: the two CLIP encoders'
penultimate layers side by side, padded to the joint width, then the T5 part (T5's output,
or zeros without T5, as the pipeline does); the pooled part is both CLIPs' projected
embeddings (``pooled_projections``). phi is the encoded empty prompt, SD 3's negative.
c_s takes the sequence's last n positions: the T5 part's padding (zeros without T5), the
same kind of slots as SD 1.x's CLIP padding, read by the joint attention like any token.

``random:sd3`` builds SD 3 medium's architecture from shipped configs, without T5 (its 4.8 B
parameters would only add zeros' worth of random text); ``tiny-sd3`` is a random SD 3 of
the sizes diffusers' own SD 3 tests use, on 32x32 images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

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
)
from hifi_backends.tiny import TINY_MAX_LENGTH, tiny_clip_config, tiny_vae
from hifi_backends.tokenizer import build_clip_tokenizer

MODEL_ENV = "HIFI_SD3_MODEL"
FOLDERS = "transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ and scheduler/"
TINY_T5_LENGTH = 8
"""The T5 part's length on ``tiny-sd3`` (SD 3's pipeline: 256)."""

__all__ = ["build_random_sd3", "build_sd3_backend", "build_sd3_fp16_backend", "build_tiny_sd3_backend", "load_sd3"]


def _clip(component: str) -> CLIPTextModelWithProjection:
    config = {k: v for k, v in load_config("sd3", component).items() if k not in ("architectures", "model_type")}
    return CLIPTextModelWithProjection(CLIPTextConfig(**config))


def build_random_sd3(
    *, seed: int = 0, sample_size: int | None = None, name: str = "sd3", device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> DiffusersBackend:
    """SD 3 medium's architecture with random weights (seeded), without T5, no download.

    ``sample_size`` overrides the transformer's latent side (128: 1024x1024 images; e.g. 8 for
    64x64 on a CPU). Both CLIP tokenizers are built locally (byte-level, 77 positions).
    """
    transformer_config = load_config("sd3", "transformer")
    if sample_size is not None:
        transformer_config["sample_size"] = sample_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel.from_config(transformer_config)
        vae = AutoencoderKL.from_config(load_config("sd3", "vae"))
        text_encoder, text_encoder_2 = _clip("text_encoder"), _clip("text_encoder_2")
    return DiffusersBackend(
        name=name, model_id=f"random:sd3:{seed}", transformer=transformer, vae=vae,
        text_encoder=text_encoder, tokenizer=build_clip_tokenizer(model_max_length=77),
        text_encoder_2=text_encoder_2, tokenizer_2=build_clip_tokenizer(model_max_length=77),
        scheduler_config=load_config("sd3", "scheduler"), device=device or default_device(), dtype=dtype,
    )


def _load_components(model: str, dtype: torch.dtype, t5: bool) -> dict[str, Any]:
    """An SD 3 folder's components; T5 (``text_encoder_3/``) when there and asked for."""
    kwargs = hub_kwargs()
    weights = {"torch_dtype": dtype, "low_cpu_mem_usage": False, **kwargs}
    try:
        parts: dict[str, Any] = {
            "transformer": SD3Transformer2DModel.from_pretrained(model, subfolder="transformer", **weights),
            "vae": AutoencoderKL.from_pretrained(model, subfolder="vae", **weights),
            "text_encoder": CLIPTextModelWithProjection.from_pretrained(
                model, subfolder="text_encoder", dtype=dtype, **kwargs),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                model, subfolder="text_encoder_2", dtype=dtype, **kwargs),
            "tokenizer": CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kwargs),
            "tokenizer_2": CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2", **kwargs),
            "scheduler_config": dict(FlowMatchEulerDiscreteScheduler.load_config(model, subfolder="scheduler",
                                                                                  **kwargs)),
        }
        if t5 and (not Path(model).is_dir() or (Path(model) / "text_encoder_3").is_dir()):
            parts["text_encoder_3"] = T5EncoderModel.from_pretrained(model, subfolder="text_encoder_3", dtype=dtype,
                                                                     **kwargs)
            parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(model, subfolder="tokenizer_3", **kwargs)
    except (OSError, ValueError) as err:
        raise loading_error(model, err, MODEL_ENV) from err
    return parts


def load_sd3(
    model: str | None = None,
    *,
    name: str = "sd3",
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    attention: str = "sdpa",
    seed: int = 0,
    t5: bool = True,
) -> DiffusersBackend:
    """SD 3 from a diffusers folder or hub id (with T5 when the folder has it and ``t5``), or
    ``random:sd3[:SEED]`` (random weights, no T5). ``attention``: the transformer keeps its own
    joint SDPA processors (``sdpa``); ``xformers`` and ``math`` are not offered for SD 3."""
    check_attention(attention)
    if attention != "sdpa":
        raise HifiError(f"--attention {attention} is not offered for SD 3: its joint attention runs on PyTorch SDPA")
    model = resolve_model(model, env=MODEL_ENV, example="stabilityai/stable-diffusion-3-medium-diffusers",
                          folders=FOLDERS)
    if model.startswith("random:"):
        spec = model.split(":")
        if spec[1] != "sd3" or len(spec) > 3 or (len(spec) == 3 and not spec[2].isdigit()):
            raise HifiError(f"model {model!r}: the random SD 3 model is random:sd3 or random:sd3:SEED")
        return build_random_sd3(seed=int(spec[2]) if len(spec) > 2 else seed, name=name, device=device, dtype=dtype)
    return DiffusersBackend(name=name, model_id=model, device=device or default_device(), dtype=dtype,
                            **_load_components(model, dtype, t5))


def build_sd3_backend(*, model: str | None = None, seed: int = 0, device: str | None = None) -> DiffusersBackend:
    """Registry entry ``sd3``: full precision."""
    return load_sd3(model, name="sd3", device=device, seed=seed)


def build_sd3_fp16_backend(
    *, model: str | None = None, seed: int = 0, device: str | None = None, precision: str = "bf16",
) -> DiffusersBackend:
    """Registry entry ``sd3-fp16``: half precision (``bf16``, the default, or ``fp16``)."""
    return load_sd3(model, name="sd3-fp16", device=device, dtype=half_precision(precision), seed=seed)


def build_tiny_sd3_backend(
    *, model: str | None = None, seed: int = 0, device: str | None = None
) -> DiffusersBackend:
    """A random tiny SD 3: two projected 32-wide CLIP encoders, no T5 (an 8-position zero part), a two-block
    MMDiT (the last block context-pre-only, as in SD 3), 32x32 images, 8x8x4 latents; ``seed`` fixes the weights."""
    if model:
        raise HifiError("the tiny-sd3 backend has random weights and loads no model; drop --model")
    tokenizer, tokenizer_2 = (build_clip_tokenizer(model_max_length=TINY_MAX_LENGTH) for _ in range(2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
        )
        vae = tiny_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
        text_encoder = CLIPTextModelWithProjection(tiny_clip_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer_2))
    return DiffusersBackend(
        name="tiny-sd3", model_id=f"random:tiny-sd3:{seed}", transformer=transformer, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        scheduler_config=load_config("sd3", "scheduler"), t5_length=TINY_T5_LENGTH, device=device or "cpu",
    )
