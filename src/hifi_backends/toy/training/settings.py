"""The training settings: :class:`TrainSettings` and its presets, a command line's ``--settings``, the device."""

from __future__ import annotations

import json
from typing import Any

import attrs
import torch


def _ints(values: Any) -> tuple[int, ...]:
    """A tuple of ints (settings read back from JSON hold lists)."""
    return tuple(int(v) for v in values)


def _latent_shape(settings: Any, _: Any, latent_channels: int) -> None:
    """The VAE's rules on its levels (three or four, 16x16 or 8x8 latents; multiples of 8) and channels."""
    from hifi_backends.toy.models import vae_config

    vae_config(settings.vae_width, latent_channels)


@attrs.frozen
class TrainSettings:
    """Step counts and sizes of every stage (the defaults are the bundled model's)."""

    seed: int = 0
    looks: int = 15_000  # pool: 2 renders of each look
    vae_steps: int = 1_100
    vae_batch: int = 16
    vae_detail_steps: int = 1_500
    clip_steps: int = 1_000
    clip_batch: int = 64
    clip_metric_steps: int = 1_200
    clip_metric_swap: float = 2.0
    identity_steps: int = 1_200
    identity_batch: int = 32
    segmenter_steps: int = 1_500
    segmenter_batch: int = 16
    detail_steps: int = 2_000
    detail_batch: int = 64
    unet_steps: int = 5_000
    unet_batch: int = 32
    caption_drop: float = 0.25  # each phrase (colour, pattern, mark, scene) left out this often
    uncond_drop: float = 0.1  # whole caption left out (classifier-free guidance)
    photo_prefix: float = 0.3  # "a photo of ..." this often
    unet_text: str = attrs.field(default="clip", validator=attrs.validators.in_(("clip", "metric", "unet")))
    """The text tower the UNet attends to: ``"clip"`` (the clip stage's), ``"metric"`` (the metric
    ToyCLIP's) or ``"unet"`` (its own, from the ``clip_unet`` stage)."""
    clip_metric_colour_swap: float = 0.0  # weight of a colour-swapped-word term in clip_metric (0: none)
    clip_unet_colour_swap: float = 2.0  # the clip_unet stage's colour-swapped-word weight
    unet_snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0: plain epsilon MSE
    unet_object_weight: float = 0.0  # extra loss weight on the latent cells the object covers (0: none)
    unet_detail_weight: float = 0.0  # extra loss weight on the cells its pattern and mark cover (0: none)
    vae_width: tuple[int, ...] = attrs.field(default=(16, 32, 64, 64), converter=_ints)
    """The VAE's levels: four give 8x8 latents (factor 8, the bundle's), three give 16x16 (factor 4)."""
    latent_channels: int = attrs.field(default=4, validator=_latent_shape)  # 4 as in SD 1.x/2.x, 16 as in SD3
    unet_width: tuple[int, ...] = attrs.field(default=(64, 128), converter=_ints)  # the UNet's levels
    unet_layers: int = 1  # ResNet + attention layers per UNet level
    device: str = "cpu"  # where the VAE, latents and UNet stages run ("cuda" on a GPU machine)
    render_workers: int = 2  # processes rendering the pool
    vae_seconds: float = 0.0
    """Wall-clock budget of each VAE stage (``vae``, then ``vae_detail``): if above 0, the step count is
    re-planned from the pace of the warm-up steps (at most ``vae_steps`` / ``vae_detail_steps``) and
    the stage's statistics record the count used, which reproduces the run as plain settings."""
    unet_seconds: float = 0.0  # the same for the UNet stage (at most ``unet_steps``)
    unet_lr: float = 4e-4  # the UNet's peak learning rate (warm-up, then cosine decay to a tenth)
    unet_init: str = ""
    """A ToyWorld bundle folder to go on from (:func:`~hifi_backends.toy.training.pipeline.finetune`): the
    UNet starts from its weights and attends to its text tower, the latents come from its VAE at its
    scaling factor, and the new bundle is that one with the UNet replaced. Empty: train everything
    from scratch."""

    @classmethod
    def quick(cls) -> TrainSettings:
        """Tiny step counts: the whole script in a minute (tests)."""
        return cls(looks=64, vae_steps=3, vae_batch=4, vae_detail_steps=3, clip_steps=3, clip_batch=8,
                   clip_metric_steps=3, identity_steps=3,
                   identity_batch=4, segmenter_steps=3, segmenter_batch=4, detail_steps=3, detail_batch=4,
                   unet_steps=4, unet_batch=4)

    @classmethod
    def gpu(cls) -> TrainSettings:
        """The GPU recipe (``--preset gpu``): a wider VAE and UNet, larger batches, more steps.

        The step counts are caps: ``vae_seconds`` and ``unet_seconds`` fit each stage to a
        wall-clock budget on the machine at hand (the VAE stages and the UNet in about six
        minutes of an H100); the counts a run used are in its ``training.json`` and reproduce
        it as plain settings. The bundle came from this recipe through
        ``benchmarks/toyworld_gpu.py``, the small models (ToyCLIP, identity, segmenter) from
        the CPU recipe of the same seed.
        """
        return cls(looks=30_000, vae_width=(32, 64, 96, 96), vae_batch=64, vae_steps=20_000, vae_detail_steps=30_000,
                   unet_width=(128, 128), unet_batch=256, unet_steps=40_000, unet_text="unet",
                   unet_snr_gamma=5.0, unet_object_weight=3.0, device="cuda", render_workers=16,
                   vae_seconds=70.0, unet_seconds=230.0)



def _device(s: TrainSettings) -> torch.device:
    """The device of the VAE, latents and UNet stages; a clear error if it is not here."""
    dev = torch.device(s.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"TrainSettings.device is {s.device!r} but this machine has no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return dev



def _check_setting(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` has the type of the TrainSettings field ``name`` (and is not negative).

    JSON gives ints, floats, strings and lists; a string where a count belongs would otherwise
    surface as a TypeError deep inside a training stage, an hour into a run.
    """
    default = attrs.fields_dict(TrainSettings)[name].default
    if isinstance(default, tuple):
        ok = isinstance(value, list) and bool(value) and all(type(v) is int and v > 0 for v in value)
        want = "a list of positive whole numbers"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, int):
        ok, want = type(value) is int and value >= 0, "a whole number >= 0"
    else:
        ok, want = type(value) in (int, float) and value >= 0, "a number >= 0"
    if not ok:
        raise ValueError(f"--settings: {name} must be {want}, not {json.dumps(value)}")


def settings_over(base: TrainSettings, text: str) -> TrainSettings:
    """``base`` with the fields of the JSON object ``text`` (a command line's ``--settings``) set.

    Raises ValueError, naming the flag, for text that is not a JSON object, an unknown field or
    a value of the wrong type.
    """
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--settings is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError("--settings must be a JSON object of TrainSettings fields")
    unknown = sorted(set(fields) - set(attrs.fields_dict(TrainSettings)))
    if unknown:
        raise ValueError(f"--settings: unknown field(s) {unknown}")
    for name, value in fields.items():
        _check_setting(name, value)
    try:
        return attrs.evolve(base, **fields)
    except ValueError as e:  # a validator (unet_text, vae_width, latent_channels)
        raise ValueError(f"--settings: {e.args[0]}") from None  # attrs puts the message first

