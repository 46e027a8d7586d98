"""Stable Diffusion backends: ``sd14`` (fp32) and ``sd14-fp16`` (fp16/bf16, selectable attention).

The same code serves SD 1.x and 2.x: everything that differs (v prediction, the 1024-wide
text encoder, the schedule) is read from the model folder's configs. ``random:sd14`` and
``random:sd21`` build those architectures with random weights from configs shipped in
the package, so the full-size code path runs without any download.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from hifi.errors import HifiError, ModelNotFoundError
from hifi.perception.models import looks_like_path
from hifi.registry import default_device
from hifi_backends.configs import load_config
from hifi_backends.diffusers_backend import DiffusersBackend
from hifi_backends.tokenizer import build_clip_tokenizer

MODEL_ENV = "HIFI_SD_MODEL"
SD_ARCHITECTURES = ("sd14", "sd21")
"""The shipped architectures this module builds (``sdxl`` is :mod:`hifi_backends.sdxl`'s)."""
ATTENTION = ("sdpa", "xformers", "math")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_random_architecture(
    architecture: str = "sd14",
    *,
    seed: int = 0,
    sample_size: int | None = None,
    name: str = "sd14",
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> DiffusersBackend:
    """The real SD 1.4 or SD 2.1 architecture with random weights (seeded), no download.

    ``sample_size`` overrides the UNet's latent side (e.g. 8 for 64x64 images on a CPU).
    The tokenizer is built locally (byte-level, CLIP format, 77 positions).
    """
    if architecture not in SD_ARCHITECTURES:
        hint = "; SDXL is its own backend (--backend sdxl --model random:sdxl)" if architecture == "sdxl" else ""
        raise HifiError(f"unknown architecture {architecture!r}; choose from {SD_ARCHITECTURES}{hint}")
    unet_config = load_config(architecture, "unet")
    if sample_size is not None:
        unet_config["sample_size"] = sample_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(load_config(architecture, "vae"))
        text_config = {k: v for k, v in load_config(architecture, "text_encoder").items()
                       if k not in ("architectures", "model_type")}
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    return DiffusersBackend(
        name=name,
        model_id=f"random:{architecture}:{seed}",
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(model_max_length=77),
        scheduler_config=load_config(architecture, "scheduler"),
        device=device or default_device(),
        dtype=dtype,
    )


def resolve_model(model: str | None, *, env: str = MODEL_ENV, example: str = "CompVis/stable-diffusion-v1-4",
                  folders: str = "unet/, vae/, text_encoder/, tokenizer/ and scheduler/") -> str:
    """``model`` (or the ``env`` variable): a local folder's full path or a hub id; a clear line when neither."""
    model = model or os.environ.get(env)
    if not model:
        raise ModelNotFoundError(
            f"no Stable Diffusion weights given: pass --model PATH (a local diffusers folder, e.g. a copy of {example})"
            f" or set {env}"
        )
    local = looks_like_path(model)
    if local and not Path(model).expanduser().is_dir():
        raise ModelNotFoundError(
            f"Stable Diffusion folder {model!r} does not exist: pass --model with a diffusers folder holding {folders}"
        )
    return str(Path(model).expanduser()) if local else model


def hub_kwargs() -> dict[str, Any]:
    """``from_pretrained`` options: local files only when ``HF_HUB_OFFLINE`` is set."""
    return {"local_files_only": os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")}


def loading_error(model: str, err: Exception, env: str = MODEL_ENV) -> ModelNotFoundError:
    """A loader's failure as one clear line naming what to supply."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelNotFoundError(
        f"could not load Stable Diffusion from {model!r} ({first}). Supply a local diffusers"
        f" folder with --model PATH or {env}; this machine may have no hub access"
    )


def _load_components(model: str, dtype: torch.dtype) -> dict[str, Any]:
    """Load the four components, turning any loader failure into one clear line."""
    kwargs = hub_kwargs()
    try:
        return {
            "unet": UNet2DConditionModel.from_pretrained(
                model, subfolder="unet", torch_dtype=dtype, low_cpu_mem_usage=False, **kwargs
            ),
            "vae": AutoencoderKL.from_pretrained(
                model, subfolder="vae", torch_dtype=dtype, low_cpu_mem_usage=False, **kwargs
            ),
            "text_encoder": CLIPTextModel.from_pretrained(
                model, subfolder="text_encoder", dtype=dtype, **kwargs
            ),
            "tokenizer": CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kwargs),
            # scheduler/scheduler_config.json, as diffusers writes it.
            "scheduler_config": dict(DDIMScheduler.load_config(model, subfolder="scheduler", **kwargs)),
        }
    except (OSError, ValueError) as err:
        raise loading_error(model, err) from err


def load_stable_diffusion(
    model: str | None = None,
    *,
    name: str = "sd14",
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    attention: str = "sdpa",
    seed: int = 0,
    channels_last: bool = False,
) -> DiffusersBackend:
    """Stable Diffusion 1.x/2.x from a diffusers folder or hub id (or ``random:sd14|sd21``).

    ``attention``: ``sdpa`` (PyTorch scaled-dot-product attention, diffusers' default),
    ``xformers`` (memory-efficient kernels; needs a working xformers install) or ``math``
    (the plain reference implementation). ``channels_last`` holds the UNet's weights in
    NHWC (:meth:`DiffusersBackend.set_channels_last`).
    """
    check_attention(attention)
    model = resolve_model(model)
    if model.startswith("random:"):
        # "random:sd14" or "random:sd14:SEED" (the model id a run records).
        spec = model.split(":")
        backend = build_random_architecture(
            spec[1], seed=int(spec[2]) if len(spec) > 2 else seed, name=name, device=device, dtype=dtype
        )
    else:
        parts = _load_components(model, dtype)
        backend = DiffusersBackend(
            name=name, model_id=model, device=device or default_device(), dtype=dtype, **parts
        )
    set_attention(backend, attention)
    if channels_last:
        backend.set_channels_last()
    return backend


def set_attention(backend: DiffusersBackend, attention: str) -> None:
    """Put the UNet's attention on ``attention`` (:data:`ATTENTION`); a clear error when xformers cannot run."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if attention == "sdpa":
        backend.set_attn_processor(AttnProcessor2_0())
    elif attention == "math":
        backend.set_attn_processor(AttnProcessor())
    else:
        try:
            backend.denoiser.enable_xformers_memory_efficient_attention()
        except Exception as err:  # xformers raises ImportError, RuntimeError, ValueError ...
            raise HifiError(
                f"xformers attention is not usable here ({type(err).__name__}: {err});"
                " use --attention sdpa"
            ) from err


def check_attention(attention: str) -> None:
    if attention not in ATTENTION:
        raise HifiError(f"unknown attention {attention!r}; choose from {ATTENTION}")


def half_precision(precision: str) -> torch.dtype:
    """``fp16`` or ``bf16`` as a dtype; a clear error for anything else."""
    if precision not in ("fp16", "bf16"):
        raise HifiError(f"precision must be fp16 or bf16, got {precision!r}")
    return _DTYPES[precision]


def build_sd14_backend(
    *, model: str | None = None, seed: int = 0, device: str | None = None
) -> DiffusersBackend:
    """Registry entry ``sd14``: full precision, PyTorch SDPA attention."""
    return load_stable_diffusion(model, name="sd14", device=device, seed=seed)


def build_sd14_fp16_backend(
    *,
    model: str | None = None,
    seed: int = 0,
    device: str | None = None,
    precision: str = "fp16",
    attention: str = "sdpa",
    channels_last: bool = False,
) -> DiffusersBackend:
    """Registry entry ``sd14-fp16``: half precision (``fp16`` or ``bf16``), selectable attention and layout."""
    return load_stable_diffusion(
        model, name="sd14-fp16", device=device, dtype=half_precision(precision), attention=attention,
        seed=seed, channels_last=channels_last,
    )
