"""DINO ViT-S/16 image embeddings (Section 3.3: the reference is the source photo closest to I_g1).

The embedding is the CLS token of the last layer (after the final layer norm) of
transformers' ``ViTModel``, the feature DreamBooth's DINO score uses.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from hifi.perception.models import DINO_MODEL_ENV, ModelSlot
from hifi_backends.perception.loading import (
    is_random,
    load_pretrained,
    pick_device,
    pick_dtype,
    place,
    read_pixel_config,
    resolve,
    with_slots,
)
from hifi_backends.perception.pixels import IMAGENET_MEAN, IMAGENET_STD, PixelConfig, to_model_pixels
from hifi_backends.perception.tiny import tiny_vit

__all__ = ["DINO_SLOT", "DinoEmbedder", "build_dino_embedder"]

DINO_SLOT = ModelSlot("DINO ViT-S/16", DINO_MODEL_ENV, "facebook/dino-vits16")
DINO_PIXELS = PixelConfig(resize=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, mode="bilinear")


@attrs.frozen(eq=False)
class DinoEmbedder:
    """:class:`~hifi.perception.ImageEmbedder` over a ``ViTModel``: the CLS token, float32 ``[B, D]``."""

    model: Any
    pixels: PixelConfig
    name: str = "dino"

    def embed(self, images: Tensor) -> Tensor:
        param = next(self.model.parameters())
        pixels = to_model_pixels(images.to(param.device), self.pixels).to(param.dtype)
        with torch.no_grad():
            hidden = self.model(pixel_values=pixels).last_hidden_state
        return hidden[:, 0].float().to(images.device)


@with_slots(DINO_SLOT)
def build_dino_embedder(
    *, model: str | None = None, device: str | None = None, dtype: str | None = None, backend: Any = None
) -> DinoEmbedder:
    """Registry entry ``dino``: ``model`` or ``$HIFI_DINO_MODEL`` or ``facebook/dino-vits16``."""
    from transformers import ViTModel

    source = resolve(DINO_SLOT, model)
    if is_random(source):
        vit, pixels = tiny_vit()
    else:
        vit = load_pretrained(ViTModel, DINO_SLOT, source, add_pooling_layer=False)
        pixels = read_pixel_config(source, DINO_PIXELS, vit.config.image_size)
    return DinoEmbedder(place(vit, pick_device(device), pick_dtype(dtype)), pixels)
