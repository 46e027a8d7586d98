"""Perception models with weights, behind :mod:`hifi.perception`'s protocols (Section 3.3).

Registered in the ``hifi.segmenters``, ``hifi.embedders`` and ``hifi.captioners``
entry-point groups, so that :mod:`hifi.perception.registry` finds them by name:

- segmenters ``grounded-sam`` (Grounding DINO boxes for the subject name, then SAM
  masks: ``$HIFI_GROUNDING_DINO_MODEL`` and ``$HIFI_SAM_MODEL``) and ``sam`` (the same with
  an original segment-anything checkpoint, ``$HIFI_SAM_CHECKPOINT``);
- embedders ``dino`` (ViT-S/16 CLS token) and ``clip`` (image and text features);
- captioners ``blip2`` and ``blip``.

Each source may be a local folder, a checkpoint file, a hub id or ``random:tiny``. A
``.pth`` SAM goes to ``segment-anything``, a ``.pth`` Grounding DINO to ``groundingdino-py``
(through :mod:`~hifi_backends.perception.groundingdino_compat`); the rest to transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hifi.perception.models import RANDOM_TINY
from hifi_backends.perception.blip import BlipCaptioner, build_blip2_captioner, build_blip_captioner
from hifi_backends.perception.clip import ClipEmbedder, build_clip_embedder
from hifi_backends.perception.dino import DinoEmbedder, build_dino_embedder
from hifi_backends.perception.grounding_dino import (
    GROUNDING_DINO_SLOT,
    BoxDetector,
    GroundedSam,
    load_grounding_dino,
)
from hifi_backends.perception.loading import pick_device, resolve, with_slots
from hifi_backends.perception.sam import SAM_CHECKPOINT_SLOT, SAM_SLOT, load_sam, load_segment_anything

__all__ = [
    "BlipCaptioner",
    "ClipEmbedder",
    "DinoEmbedder",
    "GroundedSam",
    "build_blip2_captioner",
    "build_blip_captioner",
    "build_clip_embedder",
    "build_dino_embedder",
    "build_grounded_sam",
    "build_sam_segmenter",
    "load_detector",
]


def load_detector(
    source: str, device: Any, *, box_threshold: float = 0.35, side: int | None = None, text_encoder: str | None = None
) -> BoxDetector:
    """Grounding DINO from any source: a ``.pth`` file goes to groundingdino-py, the rest to transformers."""
    if Path(source).suffix in (".pth", ".pt"):
        from hifi_backends.perception.groundingdino_compat import load_groundingdino_py

        return load_groundingdino_py(source, device, text_encoder=text_encoder, box_threshold=box_threshold)
    return load_grounding_dino(source, device, box_threshold=box_threshold, side=side)


def _detector_source(detector_model: str | None, sam_source: str) -> str:
    # A random tiny SAM comes with a random tiny detector unless one is named.
    return resolve(GROUNDING_DINO_SLOT, detector_model or (RANDOM_TINY if sam_source == RANDOM_TINY else None))


@with_slots(SAM_SLOT, GROUNDING_DINO_SLOT)
def build_grounded_sam(
    *,
    model: str | None = None,
    detector_model: str | None = None,
    device: str | None = None,
    box_threshold: float = 0.35,
    max_boxes: int = 1,
    detector_side: int | None = None,
    text_encoder: str | None = None,
    backend: Any = None,
) -> GroundedSam:
    """Registry entry ``grounded-sam``: SAM from ``model``/``$HIFI_SAM_MODEL`` (default ``facebook/sam-vit-base``),
    Grounding DINO from ``detector_model``/``$HIFI_GROUNDING_DINO_MODEL`` (``IDEA-Research/grounding-dino-tiny``)."""
    sam_source = resolve(SAM_SLOT, model)
    where = pick_device(device)
    sam = load_sam(sam_source, where)
    detector = load_detector(_detector_source(detector_model, sam_source), where, box_threshold=box_threshold,
                             side=detector_side, text_encoder=text_encoder)
    return GroundedSam(detector, sam, max_boxes)


@with_slots(SAM_CHECKPOINT_SLOT, GROUNDING_DINO_SLOT)
def build_sam_segmenter(
    *,
    model: str | None = None,
    detector_model: str | None = None,
    device: str | None = None,
    box_threshold: float = 0.35,
    max_boxes: int = 1,
    detector_side: int | None = None,
    text_encoder: str | None = None,
    sam_type: str | None = None,
    backend: Any = None,
) -> GroundedSam:
    """Registry entry ``sam``: Grounded SAM with segment-anything's ``Sam`` from an original checkpoint
    (``model`` or ``$HIFI_SAM_CHECKPOINT``: ``sam_vit_b_01ec64.pth`` ...; ``sam_type`` overrides the variant)."""
    sam_source = resolve(SAM_CHECKPOINT_SLOT, model)
    where = pick_device(device)
    sam = load_segment_anything(sam_source, where, sam_type)
    detector = load_detector(_detector_source(detector_model, sam_source), where, box_threshold=box_threshold,
                             side=detector_side, text_encoder=text_encoder)
    return GroundedSam(detector, sam, max_boxes, name="sam")
