"""Grounding DINO: the boxes of a named subject (the first half of Grounded SAM), and Grounded SAM itself.

:class:`TransformersGroundingDino` runs transformers' ``GroundingDinoForObjectDetection``
on the subject's class name as the text query (``"dog."``: lower case, ending in a full
stop, as Grounding DINO was trained). A query box's score is its highest probability over
the query's word tokens; boxes scoring above ``box_threshold`` are kept, best first.
With a single phrase the ``text_threshold`` of the Grounded SAM demo (which words label a
box) has nothing to choose, so there is none.

:class:`GroundedSam` (Section 3.3, "Grounding SAM with the subject name"): the best
``max_boxes`` boxes, then SAM for each, the union of their masks. An image where nothing
scores above the threshold gets an empty mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from hifi.errors import HifiError
from hifi.perception.models import GROUNDING_DINO_MODEL_ENV, ModelSlot
from hifi_backends.perception.loading import (
    is_random,
    load_pretrained,
    load_tokenizer,
    place,
    read_pixel_config,
)
from hifi_backends.perception.pixels import IMAGENET_MEAN, IMAGENET_STD, PixelConfig, normalize
from hifi_backends.perception.sam import BoxSegmenter
from hifi_backends.perception.tiny import tiny_grounding_dino

__all__ = [
    "GROUNDING_DINO_SLOT",
    "BoxDetector",
    "Detections",
    "GroundedSam",
    "TransformersGroundingDino",
    "boxes_to_pixels",
    "detection_query",
    "detector_pixels",
    "load_grounding_dino",
    "select_boxes",
]

GROUNDING_DINO_SLOT = ModelSlot("Grounding DINO", GROUNDING_DINO_MODEL_ENV, "IDEA-Research/grounding-dino-tiny")
DETECTOR_SIDE, DETECTOR_MAX_SIDE = 800, 1333
"""Grounding DINO's input: the shortest side at 800 pixels, the longest at most 1333."""
_DEFAULT_PIXELS = PixelConfig(resize=DETECTOR_SIDE, mean=IMAGENET_MEAN, std=IMAGENET_STD, mode="bilinear")


@attrs.frozen(eq=False)
class Detections:
    """Boxes ``[K, 4]`` (x0, y0, x1, y1 in the image's pixels) and their scores ``[K]``, best first."""

    boxes: Tensor
    scores: Tensor


class BoxDetector(Protocol):
    """Open-vocabulary detection: images ``[B, 3, H, W]`` in [-1, 1] and a phrase -> one :class:`Detections` each."""

    def detect(self, images: Tensor, phrase: str) -> list[Detections]: ...


def detection_query(phrase: str) -> str:
    """``"Dog"`` -> ``"dog."``: Grounding DINO's text format."""
    query = phrase.strip().lower()
    if not query:
        raise HifiError("Grounding DINO needs a subject name to look for")
    return query if query.endswith(".") else query + "."


def boxes_to_pixels(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Normalised ``(cx, cy, w, h)`` boxes ``[..., 4]`` -> pixel ``(x0, y0, x1, y1)`` in an image of ``size`` (h, w)."""
    cx, cy, w, h = boxes.float().unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    scale = torch.tensor([size[1], size[0], size[1], size[0]], dtype=torch.float32, device=boxes.device)
    return xyxy.clamp(0, 1) * scale


def select_boxes(logits: Tensor, words: Tensor, boxes: Tensor, threshold: float, images: Tensor) -> list[Detections]:
    """Grounding DINO's outputs -> the boxes whose best word scores above ``threshold``, best first, per image.

    ``logits`` ``[B, Q, T]`` over the query's tokens, ``words`` ``[B, T]`` (or ``[T]``)
    marking its word tokens, ``boxes`` ``[B, Q, 4]`` normalised ``(cx, cy, w, h)``.
    """
    scores = (logits.float().sigmoid().cpu() * words.view(-1, 1, words.shape[-1]).cpu()).max(dim=-1).values
    size = (int(images.shape[-2]), int(images.shape[-1]))
    found = []
    for k in range(images.shape[0]):
        keep = (scores[k] > threshold).nonzero().flatten()
        keep = keep[scores[k][keep].argsort(descending=True)]
        pixel_boxes = boxes_to_pixels(boxes[k].float().cpu()[keep], size)
        found.append(Detections(pixel_boxes.to(images.device), scores[k][keep].to(images.device)))
    return found


def detector_pixels(
    images: Tensor, side: int, max_side: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Tensor:
    """Images in [-1, 1] -> Grounding DINO's input: shortest side ``side`` (longest <= ``max_side``), normalised."""
    h, w = images.shape[-2:]
    scale = min(side / min(h, w), max_side / max(h, w))
    size = (round(h * scale), round(w * scale))
    unit = ((images.float() + 1) / 2).clamp(0, 1)
    if size != (h, w):
        unit = F.interpolate(unit, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return normalize(unit, mean, std)


@attrs.frozen(eq=False)
class TransformersGroundingDino:
    """:class:`BoxDetector` over ``GroundingDinoForObjectDetection`` and its BERT tokenizer."""

    model: Any
    tokenizer: Any
    box_threshold: float = 0.35
    side: int = DETECTOR_SIDE
    max_side: int = DETECTOR_MAX_SIDE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def detect(self, images: Tensor, phrase: str) -> list[Detections]:
        param = next(self.model.parameters())
        tokens = self.tokenizer([detection_query(phrase)] * images.shape[0], return_tensors="pt")
        pixels = detector_pixels(images.to(param.device), self.side, self.max_side, self.mean, self.std)
        with torch.no_grad():
            out = self.model(
                pixel_values=pixels.to(param.dtype),
                input_ids=tokens.input_ids.to(param.device),
                attention_mask=tokens.attention_mask.to(param.device),
                token_type_ids=tokens.token_type_ids.to(param.device),
            )
        length = tokens.input_ids.shape[1]
        words = ~torch.isin(tokens.input_ids, torch.tensor(self.tokenizer.all_special_ids + [self._stop_id]))
        return select_boxes(out.logits[..., :length], words, out.pred_boxes, self.box_threshold, images)

    @property
    def _stop_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids("."))


def load_grounding_dino(
    source: str, device: torch.device, *, box_threshold: float = 0.35, side: int | None = None
) -> TransformersGroundingDino:
    """transformers' Grounding DINO from a folder, hub id, checkpoint file, or ``random:tiny``."""
    from transformers import GroundingDinoForObjectDetection

    if is_random(source):
        model, tokenizer = tiny_grounding_dino()
        return TransformersGroundingDino(place(model, device), tokenizer, box_threshold, side or 64, 64)
    pixels = read_pixel_config(source, _DEFAULT_PIXELS)
    model = load_pretrained(GroundingDinoForObjectDetection, GROUNDING_DINO_SLOT, source)
    tokenizer = load_tokenizer(GROUNDING_DINO_SLOT, source)
    return TransformersGroundingDino(
        place(model, device), tokenizer, box_threshold, side or pixels.resize, DETECTOR_MAX_SIDE, pixels.mean,
        pixels.std,
    )


@attrs.frozen(eq=False)
class GroundedSam:
    """:class:`~hifi.perception.Segmenter`: Grounding DINO boxes for the class name, SAM masks inside them."""

    detector: BoxDetector
    sam: BoxSegmenter
    max_boxes: int = 1
    name: str = "grounded-sam"
    wants_attention: bool = False

    def detections(self, images: Tensor, class_name: str) -> list[Detections]:
        """The boxes :meth:`segment` segments: the best ``max_boxes`` above the threshold, per image."""
        found = self.detector.detect(images, class_name)
        return [Detections(d.boxes[: self.max_boxes], d.scores[: self.max_boxes]) for d in found]

    def segment(self, images: Tensor, class_name: str, attention: Tensor | None = None) -> Tensor:
        boxes: Sequence[Tensor] = [d.boxes for d in self.detections(images, class_name)]
        masks = self.sam.segment_boxes(images, boxes)
        return torch.stack([m.any(dim=0) for m in masks]).to(images.device)
