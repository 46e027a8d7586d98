"""What reference-guided generation needs from perception models (Section 3.3), as narrow protocols.

Algorithm 2 needs three models besides the denoiser: a segmenter for the subject mask M_g
of the generated image I_g1 (Grounding SAM in the paper), an image embedder to choose the
reference photo I_r (DINO ViT-S/16) and a captioner for the inversion prompt c_r (BLIP-2).
They are :class:`Segmenter`, :class:`ImageEmbedder` and :class:`Captioner`, bundled as
:class:`Perception`; :mod:`hifi.perception` implements and finds them.

:class:`PerceptionPreferences` is an optional capability: a backend (or its registry
factory) that declares it names the perception models that suit it, by registry name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import attrs
from torch import Tensor

__all__ = ["Captioner", "ImageEmbedder", "Perception", "PerceptionPreferences", "Segmenter"]


@runtime_checkable
class Segmenter(Protocol):
    """Finds the subject in generated images (M_g of Section 3.3)."""

    @property
    def name(self) -> str: ...

    @property
    def wants_attention(self) -> bool:
        """True when :meth:`segment` reads the subject tokens' cross-attention maps, which the
        pipeline then records while it generates the image."""
        ...

    def segment(self, images: Tensor, class_name: str, attention: Tensor | None = None) -> Tensor:
        """Boolean subject masks ``[B, H, W]`` for images ``[B, 3, H, W]`` in [-1, 1].

        ``attention`` is ``[B, h, w]``, the subject tokens' cross-attention averaged over
        layers and the recorded steps (see :func:`hifi.perception.subject_attention`), or None
        when it was not recorded. An image without the subject gets an all-False mask.
        """
        ...


@runtime_checkable
class ImageEmbedder(Protocol):
    """Image embeddings whose cosine similarity measures subject resemblance (DINO in the paper)."""

    @property
    def name(self) -> str: ...

    def embed(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> float32 embeddings ``[B, D]``."""
        ...


@runtime_checkable
class Captioner(Protocol):
    """Captions for the reference photo, the prompt c_r of its inversion (BLIP-2 in the paper)."""

    @property
    def name(self) -> str: ...

    def caption(self, images: Tensor, class_name: str) -> list[str]:
        """One caption per image ``[B, 3, H, W]`` in [-1, 1]."""
        ...


@attrs.frozen
class Perception:
    """The three perception models reference-guided generation calls."""

    segmenter: Segmenter
    embedder: ImageEmbedder
    captioner: Captioner

    def describe(self) -> dict[str, str]:
        return {"segmenter": self.segmenter.name, "embedder": self.embedder.name, "captioner": self.captioner.name}


@runtime_checkable
class PerceptionPreferences(Protocol):
    """Optional capability: the perception models that suit a backend, before the environment's.

    Declared by a backend instance, and by its registry factory where the preferences are
    needed without building the backend (``hifi eval`` picking its metric models).
    """

    @property
    def perception_defaults(self) -> Mapping[str, str]:
        """Registry names by role: ``segmenter``, ``embedder`` (DINO's role), ``clip`` (CLIP's role)."""
        ...
