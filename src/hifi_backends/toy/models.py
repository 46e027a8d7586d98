"""ToyWorld's model architectures: the configs of every model the bundle holds.

The diffusion model is Stable Diffusion's shape at toy size (an ``AutoencoderKL`` with a
factor-8 latent, a ``UNet2DConditionModel`` attending to a CLIP text tower), so the same
generic backend code loads it. ToyCLIP is a transformers ``CLIPModel`` with small configs;
the UNet attends to its text tower. The metric ToyCLIP pairs that text tower
(``CLIPTextModelWithProjection``) with a small CNN image tower (:class:`ClipImageTower`),
because CLIP's ViT tower did not learn object shapes on this machine's budget (see
:func:`hifi_backends.toy.training.towers.stage_clip_metric`).
The identity embedder (DINO's role), the segmenter (Grounded SAM's role) and the detail
classifier (the check's judge of patterns and marks) are small convolutional networks
defined here, saved as safetensors plus a JSON config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from hifi.toyworld.world import SIZE, vocabulary
from hifi_backends.tokenizer import build_clip_tokenizer

__all__ = [
    "CONTEXT",
    "DETAIL_HEADS",
    "ClipImageTower",
    "DetailNet",
    "IdentityNet",
    "MaskNet",
    "build_clip",
    "crop_to_object",
    "build_tokenizer",
    "unet_config",
    "vae_config",
]

CONTEXT = 32
"""ToyCLIP's text length: the longest prompt is 16 tokens, so c_s's last 5 slots are padding."""


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose whole words are this world's vocabulary (bytes for the rest)."""
    return build_clip_tokenizer(words=vocabulary(), model_max_length=CONTEXT)


def build_clip(tokenizer: CLIPTokenizer) -> CLIPModel:
    """ToyCLIP: a 3-layer, 64-wide text tower and a 4-layer ViT over 8x8 patches."""
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=SIZE,
            patch_size=8,
            hidden_size=96,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
        ),
        projection_dim=64,
    )
    return CLIPModel(config)


def vae_config(width: tuple[int, ...] = (16, 32, 64, 64), latent_channels: int = 4) -> dict[str, Any]:
    """An AutoencoderKL for 64x64x3 images: four levels give 8x8 latents (Stable Diffusion's factor 8),
    three give 16x16 (factor 4).

    ``width``: the channels of the levels (three or four numbers, each a multiple of 8);
    ``latent_channels``: 4 as in SD 1.x/2.x and SDXL, 16 as in SD3.
    """
    if len(width) not in (3, 4) or any(w % 8 for w in width):
        raise ValueError(f"vae width must be three or four multiples of 8, got {width}")
    if latent_channels < 1:
        raise ValueError(f"latent_channels must be at least 1, got {latent_channels}")
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(width),
        down_block_types=("DownEncoderBlock2D",) * len(width),
        up_block_types=("UpDecoderBlock2D",) * len(width),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def unet_config(cross_attention_dim: int = 64, width: tuple[int, ...] = (64, 128), layers: int = 1,
                latent_side: int = SIZE // 8, latent_channels: int = 4) -> dict[str, Any]:
    """A conditional UNet on ``latent_side`` x ``latent_side`` x ``latent_channels`` latents (8x8x4 by
    default), cross-attending to the text tower.

    ``width``: the channels of each level (two by default: 8x8 and 4x4; multiples of 32);
    ``layers``: ResNet + attention layers per level.
    """
    if not 1 <= len(width) <= 3 or any(w % 32 for w in width) or layers < 1:
        raise ValueError(f"unet width must be 1 to 3 multiples of 32 and layers >= 1, got {width}, {layers}")
    if latent_side % 2 ** (len(width) - 1):
        raise ValueError(f"a {latent_side}x{latent_side} latent cannot be halved {len(width) - 1} times")
    return dict(
        sample_size=latent_side,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=layers,
        block_out_channels=tuple(width),
        down_block_types=("CrossAttnDownBlock2D",) * len(width),
        up_block_types=("CrossAttnUpBlock2D",) * len(width),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=16,
        norm_num_groups=32,
    )


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class IdentityNet(nn.Module):
    """DINO's role: an embedding in which renders of the same object are close.

    Input ``[B, 3, 64, 64]`` in [0, 1]; output ``[B, dim]`` (not normalised; cosine is the metric).
    """

    def __init__(self, width: int = 16, dim: int = 128) -> None:
        super().__init__()
        self.config = {"width": width, "dim": dim}
        w = width
        self.features = nn.Sequential(
            _conv(3, w), _conv(w, w, 2), _conv(w, 2 * w), _conv(2 * w, 2 * w, 2),
            _conv(2 * w, 4 * w), _conv(4 * w, 4 * w, 2), _conv(4 * w, 4 * w),
        )
        self.head = nn.Sequential(nn.Linear(8 * w, 4 * w), nn.SiLU(), nn.Linear(4 * w, dim))

    def forward(self, images: Tensor) -> Tensor:
        f = self.features(images * 2.0 - 1.0)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


class MaskNet(nn.Module):
    """Grounded SAM's role: the object's mask logits ``[B, 64, 64]`` of ``[B, 3, 64, 64]`` images.

    A small U-Net working at 32x32 and below; the logits are upsampled to the input size.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.config = {"width": width}
        w = width
        self.down1 = nn.Sequential(_conv(3, w, 2), _conv(w, w))
        self.down2 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.down3 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w), _conv(4 * w, 4 * w))
        self.up2 = nn.Sequential(_conv(6 * w, 2 * w), _conv(2 * w, 2 * w))
        self.up1 = nn.Sequential(_conv(3 * w, w), nn.Conv2d(w, 1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        up = nn.functional.interpolate
        x1 = self.down1(images * 2.0 - 1.0)
        x2 = self.down2(x1)
        x3 = self.down3(x2)
        y2 = self.up2(torch.cat([up(x3, scale_factor=2.0), x2], dim=1))
        y1 = self.up1(torch.cat([up(y2, scale_factor=2.0), x1], dim=1))
        return up(y1, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


class ClipImageTower(nn.Module):
    """The metric ToyCLIP's image tower: :class:`IdentityNet`'s convolutional body and a
    linear projection into the text tower's ``projection_dim`` space.

    Input ``[B, 3, 64, 64]`` in [0, 1]; output ``[B, projection_dim]`` (not normalised).
    Measured here, classifying the object's class on held-out renders with a linear head,
    batch 64: CLIP's ViT tower at toy size (4 layers over 8x8 patches, already trained by
    the contrastive phases) reached 31% after 400 steps, a small ConvNext config 15% after
    300, this convolutional body 99% after 300 from scratch.
    """

    def __init__(self, width: int = 16, dim: int = 128, projection_dim: int = 64) -> None:
        super().__init__()
        self.config = {"width": width, "dim": dim, "projection_dim": projection_dim}
        self.body = IdentityNet(width, dim)
        self.projection = nn.Linear(dim, projection_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.projection(self.body(images))


DETAIL_HEADS = ("pattern", "colour2", "mark", "mark_colour")
"""The detail classifier's heads: a look's pattern and its colour, its mark and the mark's colour."""


def crop_to_object(images: Tensor, masks: Tensor, size: int = SIZE, margin: Tensor | float = 0.15,
                   shift: Tensor | None = None) -> Tensor:
    """Each image's object: the square around its mask's bounding box, ``margin`` of its side wider each way
    (per image, or one value), moved by ``shift`` (``[B, 2]`` fractions of the side, or none), resized to
    ``size``. Images ``[B, 3, H, W]``, masks ``[B, H, W]``; an empty mask keeps the whole image.

    A 64-pixel ToyWorld object is about 30 pixels across: cropped, its pattern and mark are twice as
    large for the detail classifier.
    """
    import torch.nn.functional as F

    b, _, h, w = images.shape
    margins = torch.as_tensor(margin, dtype=torch.float32).expand(b)
    crops = []
    for i in range(b):
        ys, xs = torch.nonzero(masks[i], as_tuple=True)
        if len(ys) == 0:
            crops.append(F.interpolate(images[i : i + 1], size=(size, size), mode="bilinear", align_corners=False,
                                       antialias=True))
            continue
        cy, cx = (ys.min() + ys.max() + 1).float() / 2, (xs.min() + xs.max() + 1).float() / 2
        side = float(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)) * (1 + 2 * float(margins[i]))
        if shift is not None:
            cy, cx = cy + float(shift[i, 0]) * side, cx + float(shift[i, 1]) * side
        # An affine grid over [cx - side/2, cx + side/2] (zeros outside the image: padding).
        theta = torch.tensor([[side / w, 0.0, 2 * float(cx) / w - 1], [0.0, side / h, 2 * float(cy) / h - 1]],
                             dtype=images.dtype, device=images.device)
        grid = F.affine_grid(theta[None], [1, 3, size, size], align_corners=False)
        crops.append(F.grid_sample(images[i : i + 1], grid, mode="bilinear", padding_mode="border",
                                   align_corners=False))
    return torch.cat(crops)


class DetailNet(nn.Module):
    """What a picture's object is made of: logits of its pattern, the pattern's colour, its mark and the mark's colour.

    Input ``[B, 3, 64, 64]`` in [0, 1], the object's crop (:func:`crop_to_object`); output a dict of
    ``[B, classes]`` logits per head of
    :data:`DETAIL_HEADS` (:data:`~hifi.toyworld.world.PATTERNS`, :data:`~hifi.toyworld.world.COLOURS`,
    :data:`~hifi.toyworld.world.MARKS`, the colours again). The body is :class:`IdentityNet`'s
    convolutions with one stride fewer (a 16x16 map: a stripe or a cross is a few pixels).
    """

    def __init__(self, width: int = 24) -> None:
        from hifi.toyworld.world import COLOURS, MARKS, PATTERNS

        super().__init__()
        self.config = {"width": width}
        w = width
        self.features = nn.Sequential(
            _conv(3, w), _conv(w, w, 2), _conv(w, 2 * w), _conv(2 * w, 2 * w, 2),
            _conv(2 * w, 4 * w), _conv(4 * w, 4 * w),
        )
        sizes = {"pattern": len(PATTERNS), "colour2": len(COLOURS), "mark": len(MARKS), "mark_colour": len(COLOURS)}
        self.heads = nn.ModuleDict({k: nn.Linear(8 * w, n) for k, n in sizes.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        f = self.features(images * 2.0 - 1.0)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return {k: head(pooled) for k, head in self.heads.items()}
