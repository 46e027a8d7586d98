"""SAM: boxes in, masks out (the second half of Grounded SAM), from two implementations.

- :class:`TransformersSam`: transformers' ``SamModel`` (a folder or hub id such as
  ``facebook/sam-vit-base``, or a ``.safetensors`` file beside its ``config.json``).
- :class:`SegmentAnythingSam`: the ``segment-anything`` package's ``Sam``, loading the
  original ``sam_vit_b/l/h`` ``.pth`` checkpoints (the variant is read from the weights).

Both take images ``[B, 3, H, W]`` in [-1, 1] and, per image, boxes ``[K, 4]`` (x0, y0, x1, y1
in that image's pixels), run the image encoder once for the batch, and return one bool mask
``[K, H, W]`` per box: single-mask output, as SAM's authors advise for box prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import torch
from torch import Tensor

from hifi.errors import HifiError
from hifi.perception.models import SAM_CHECKPOINT_ENV, SAM_MODEL_ENV, ModelSlot
from hifi_backends.perception.loading import (
    is_random,
    load_pretrained,
    load_state_dict,
    missing_model,
    place,
    read_pixel_config,
)
from hifi_backends.perception.pixels import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PixelConfig,
    masks_from_low_res,
    resize_longest_side,
    resized_shape,
)
from hifi_backends.perception.tiny import tiny_sam, tiny_segment_anything

__all__ = [
    "SAM_CHECKPOINT_SLOT",
    "SAM_SLOT",
    "BoxSegmenter",
    "SegmentAnythingSam",
    "TransformersSam",
    "load_sam",
    "load_segment_anything",
    "scale_boxes",
]

SAM_SLOT = ModelSlot("SAM (transformers)", SAM_MODEL_ENV, "facebook/sam-vit-base")
SAM_CHECKPOINT_SLOT = ModelSlot("SAM checkpoint (segment-anything)", SAM_CHECKPOINT_ENV)

SAM_VARIANTS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
"""segment-anything's image encoder width -> its builder in ``sam_model_registry``."""


class BoxSegmenter(Protocol):
    """Masks for box prompts: per image, ``[K, 4]`` pixel boxes -> ``[K, H, W]`` bool."""

    def segment_boxes(self, images: Tensor, boxes: Sequence[Tensor]) -> list[Tensor]: ...


def scale_boxes(boxes: Tensor, size: tuple[int, int], resized: tuple[int, int]) -> Tensor:
    """Pixel boxes of an image of ``size`` -> the same boxes in its resized copy ``resized`` (both ``(h, w)``)."""
    scale = torch.tensor([resized[1] / size[1], resized[0] / size[0]] * 2, dtype=torch.float32, device=boxes.device)
    return boxes.float() * scale


def _check(images: Tensor, boxes: Sequence[Tensor]) -> None:
    if len(boxes) != images.shape[0]:
        raise HifiError(f"{len(boxes)} box sets for {images.shape[0]} images")


@attrs.frozen(eq=False)
class TransformersSam:
    """:class:`BoxSegmenter` over transformers' ``SamModel``."""

    model: Any
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def segment_boxes(self, images: Tensor, boxes: Sequence[Tensor]) -> list[Tensor]:
        _check(images, boxes)
        param = next(self.model.parameters())
        side = int(self.model.config.vision_config.image_size)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        resized = resized_shape(size, side)
        pixels = resize_longest_side(images.to(param.device), side, self.mean, self.std).to(param.dtype)
        masks = []
        with torch.no_grad():
            embeddings = self.model.get_image_embeddings(pixels)
            for k, box in enumerate(boxes):
                if box.shape[0] == 0:
                    masks.append(torch.zeros(0, *size, dtype=torch.bool, device=images.device))
                    continue
                out = self.model(
                    image_embeddings=embeddings[k : k + 1],
                    input_boxes=scale_boxes(box.to(param.device), size, resized)[None].to(param.dtype),
                    multimask_output=False,
                )
                masks.append(masks_from_low_res(out.pred_masks[0, :, 0], side, resized, size).to(images.device))
        return masks


@attrs.frozen(eq=False)
class SegmentAnythingSam:
    """:class:`BoxSegmenter` over segment-anything's ``Sam``: ``SamPredictor.predict_torch`` for a batch."""

    model: Any

    def segment_boxes(self, images: Tensor, boxes: Sequence[Tensor]) -> list[Tensor]:
        _check(images, boxes)
        sam = self.model
        device = sam.pixel_mean.device
        dtype = sam.pixel_mean.dtype
        side = int(sam.image_encoder.img_size)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        resized = resized_shape(size, side)
        mean = tuple(float(v) / 255 for v in sam.pixel_mean.flatten())
        std = tuple(float(v) / 255 for v in sam.pixel_std.flatten())
        pixels = resize_longest_side(images.to(device), side, mean, std).to(dtype)
        masks = []
        with torch.no_grad():
            embeddings = sam.image_encoder(pixels)
            for k, box in enumerate(boxes):
                if box.shape[0] == 0:
                    masks.append(torch.zeros(0, *size, dtype=torch.bool, device=images.device))
                    continue
                sparse, dense = sam.prompt_encoder(
                    points=None, boxes=scale_boxes(box.to(device), size, resized).to(dtype), masks=None
                )
                low_res, _ = sam.mask_decoder(
                    image_embeddings=embeddings[k : k + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
                )
                masks.append(masks_from_low_res(low_res[:, 0], side, resized, size).to(images.device))
        return masks


def load_segment_anything(source: str, device: torch.device, sam_type: str | None = None) -> SegmentAnythingSam:
    """An original SAM checkpoint (``sam_vit_b_01ec64.pth`` ...) into segment-anything's ``Sam``."""
    try:
        from segment_anything import sam_model_registry
    except ImportError as err:
        raise HifiError(
            "SAM .pth checkpoints need the segment-anything package: pip install 'hifi[perception]'"
        ) from err
    if is_random(source):
        return SegmentAnythingSam(place(tiny_segment_anything(), device))
    path = Path(source).expanduser()
    if not path.is_file():
        raise missing_model(SAM_CHECKPOINT_SLOT, source, "no such file")
    state = load_state_dict(path)
    width = state.get("image_encoder.patch_embed.proj.weight")
    variant = sam_type or (SAM_VARIANTS.get(int(width.shape[0])) if width is not None else None)
    if variant not in sam_model_registry:
        raise HifiError(f"{path} is not a segment-anything SAM checkpoint (vit_b, vit_l or vit_h)")
    sam = sam_model_registry[variant]()
    try:
        sam.load_state_dict(state)
    except RuntimeError as err:
        raise HifiError(f"{path} does not fit segment-anything's {variant} ({str(err).splitlines()[0]})") from err
    return SegmentAnythingSam(place(sam, device))


def load_sam(source: str, device: torch.device) -> BoxSegmenter:
    """SAM from any source: a ``.pth``/``.pt`` file goes to segment-anything, the rest to ``SamModel``."""
    from transformers import SamModel

    if is_random(source):
        return TransformersSam(place(tiny_sam(), device))
    if Path(source).suffix in (".pth", ".pt"):
        return load_segment_anything(source, device)
    pixels = read_pixel_config(source, PixelConfig(resize=1024, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    return TransformersSam(place(load_pretrained(SamModel, SAM_SLOT, source), device), pixels.mean, pixels.std)
