"""CLIP image and text features in one space (CLIP-I and CLIP-T scores, or an alternative reference chooser)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from hifi.perception.models import CLIP_MODEL_ENV, ModelSlot
from hifi_backends.perception.loading import (
    load_image_text_model,
    pick_device,
    pick_dtype,
    place,
    with_slots,
)
from hifi_backends.perception.pixels import CLIP_MEAN, CLIP_STD, PixelConfig, to_model_pixels
from hifi_backends.perception.tiny import tiny_clip

__all__ = ["CLIP_SLOT", "ClipEmbedder", "build_clip_embedder"]

CLIP_SLOT = ModelSlot("CLIP", CLIP_MODEL_ENV, "openai/clip-vit-base-patch32")
CLIP_PIXELS = PixelConfig(resize=224, mean=CLIP_MEAN, std=CLIP_STD, crop=224)


def _features(out: Any) -> Tensor:
    """``get_*_features`` returns the projected tensor (transformers 4) or an output holding it (5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


@attrs.frozen(eq=False)
class ClipEmbedder:
    """:class:`~hifi.perception.ImageEmbedder` over a ``CLIPModel``: projected image features, and
    :meth:`embed_text` for projected text features in the same space."""

    model: Any
    tokenizer: Any
    pixels: PixelConfig
    name: str = "clip"

    @property
    def _param(self) -> Tensor:
        return next(self.model.parameters())

    def embed(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> float32 ``[B, projection_dim]``."""
        pixels = to_model_pixels(images.to(self._param.device), self.pixels).to(self._param.dtype)
        with torch.no_grad():
            features = _features(self.model.get_image_features(pixel_values=pixels))
        return features.float().to(images.device)

    def embed_text(self, texts: Sequence[str]) -> Tensor:
        """Prompts -> float32 ``[N, projection_dim]`` on the model's device (truncated to the text tower's length)."""
        length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=length, return_tensors="pt")
        with torch.no_grad():
            features = _features(self.model.get_text_features(
                input_ids=tokens.input_ids.to(self._param.device),
                attention_mask=tokens.attention_mask.to(self._param.device),
            ))
        return features.float()


@with_slots(CLIP_SLOT)
def build_clip_embedder(
    *, model: str | None = None, device: str | None = None, dtype: str | None = None, backend: Any = None
) -> ClipEmbedder:
    """Registry entry ``clip``: ``model`` or ``$HIFI_CLIP_MODEL`` or ``openai/clip-vit-base-patch32``."""
    from transformers import CLIPModel

    clip, tokenizer, pixels = load_image_text_model(CLIP_SLOT, CLIPModel, model, tiny_clip, CLIP_PIXELS)
    return ClipEmbedder(place(clip, pick_device(device), pick_dtype(dtype)), tokenizer, pixels)
