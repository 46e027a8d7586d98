"""Images ``[B, 3, H, W]`` in [-1, 1] -> the pixel format each perception model was trained on.

Pure tensor functions, batched and on the images' device: what a Hugging Face image
processor does with PIL and numpy, done here without one (so that nothing needs a
processor download, and a random tiny model gets the same path as the real one).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@attrs.frozen
class PixelConfig:
    """How a model wants its pixels: ``resize`` (square side, or the shortest side when
    ``crop`` is set, then a centre crop of ``crop``), and per-channel ``mean``/``std`` in [0, 1]."""

    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: int | None = None
    mode: str = "bicubic"


def normalize(unit: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> ``(x - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=unit.dtype, device=unit.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=unit.dtype, device=unit.device).view(1, -1, 1, 1)
    return (unit - m) / s


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    antialias = mode in ("bilinear", "bicubic")
    return F.interpolate(x, size=size, mode=mode, align_corners=False if antialias else None, antialias=antialias)


def to_model_pixels(images: Tensor, config: PixelConfig) -> Tensor:
    """Images in [-1, 1] -> normalised float32 pixels at the model's size (see :class:`PixelConfig`)."""
    unit = ((images.float() + 1) / 2).clamp(0, 1)
    if config.crop is None:
        unit = _resize(unit, (config.resize, config.resize), config.mode)
    else:
        h, w = unit.shape[-2:]
        scale = config.resize / min(h, w)
        unit = _resize(unit, (max(config.crop, round(h * scale)), max(config.crop, round(w * scale))), config.mode)
        top = (unit.shape[-2] - config.crop) // 2
        left = (unit.shape[-1] - config.crop) // 2
        unit = unit[..., top : top + config.crop, left : left + config.crop]
    return normalize(unit.clamp(0, 1), config.mean, config.std)


def resize_longest_side(images: Tensor, side: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """SAM's input: the longest side resized to ``side``, normalised, zero-padded bottom-right to a square."""
    unit = ((images.float() + 1) / 2).clamp(0, 1)
    resized = _resize(unit, resized_shape((unit.shape[-2], unit.shape[-1]), side), "bilinear").clamp(0, 1)
    normed = normalize(resized, mean, std)
    return F.pad(normed, (0, side - normed.shape[-1], 0, side - normed.shape[-2]))


def resized_shape(shape: tuple[int, int], side: int) -> tuple[int, int]:
    """The ``(h, w)`` that :func:`resize_longest_side` gives an image of ``shape``."""
    scale = side / max(shape)
    return int(shape[0] * scale + 0.5), int(shape[1] * scale + 0.5)


def masks_from_low_res(low_res: Tensor, side: int, resized: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """SAM's low-resolution mask logits ``[K, h, w]`` -> bool masks ``[K, H, W]`` of the original image.

    Upsampled to the padded input square, the padding cropped off, resized to ``size``
    and cut at logit 0: what ``SamImageProcessor.post_process_masks`` and
    ``Sam.postprocess_masks`` do.
    """
    x = F.interpolate(low_res[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)
    x = x[..., : resized[0], : resized[1]]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[:, 0] > 0
