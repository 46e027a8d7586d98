"""Perception for reference-guided generation (Section 3.3): find the subject, compare photos, caption them.

Algorithm 2 needs three models besides the denoiser: a segmenter for the subject mask M_g
of the generated image I_g1 (Grounding SAM in the paper), an image embedder to choose the
reference photo I_r (DINO ViT-S/16) and a captioner for the inversion prompt c_r (BLIP-2).
They are narrow protocols here (:class:`Segmenter`, :class:`ImageEmbedder`,
:class:`Captioner`), bundled as :class:`Perception`. The implementations in this module
need no weights beyond the backend's own, so the whole pipeline runs on any backend:

- :class:`AttentionSegmenter`: the cross-attention maps of the subject tokens recorded
  while I_g1 was generated (Figure 3: late in denoising the c_s tokens are attended by the
  subject's regions), thresholded (Otsu) and cleaned (largest component, holes filled).
- :class:`VaeLatentEmbedder`: pooled statistics of the backend's own VAE latents.
- :class:`TemplateCaptioner`: ``"a photo of a <class>"``.

The source photos need no segmenter: their masks are the ones the run was tuned with.

:func:`observed_attention` records cross-attention without changing a single number of the
computation, so that I_g1 drawn while recording is exactly the plain Eq. 7 image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from hifi.algorithms.attention import AttentionStore
from hifi.errors import HifiError
from hifi.protocols.denoiser import DenoiserBackend

__all__ = [
    "AttentionSegmenter",
    "Captioner",
    "ImageEmbedder",
    "Perception",
    "Segmenter",
    "TemplateCaptioner",
    "VaeLatentEmbedder",
    "default_perception",
    "fill_holes",
    "largest_component",
    "otsu_threshold",
    "subject_attention",
]


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
        layers and the recorded steps (see :func:`subject_attention`), or None when it was
        not recorded. An image without the subject gets an all-False mask.
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


def default_perception(backend: DenoiserBackend) -> Perception:
    """The weight-free perception of this module, for any backend."""
    return Perception(AttentionSegmenter(), VaeLatentEmbedder(backend), TemplateCaptioner())


# Recording attention ---------------------------------------------------------------------


def subject_attention(store: AttentionStore, positions: Sequence[int], batch: int) -> Tensor:
    """The subject tokens' cross-attention ``[batch, side, side]`` from a store of a guided generation.

    Averaged over the recorded layers and steps and over the token ``positions``. The store
    saw the batch ``[phi, c]`` of classifier-free guidance (or ``[c]`` alone at guidance 1):
    the conditional rows are the last ``batch``.
    """
    if not positions:
        raise HifiError("no subject token positions to read the attention of")
    maps = store.token_maps()
    return maps[-batch:][..., list(positions)].float().mean(dim=-1)


# Segmenter -------------------------------------------------------------------------------


def otsu_threshold(values: Tensor, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance."""
    hist = torch.histc(values.float().flatten(), bins=bins, min=0.0, max=1.0)
    p = hist / hist.sum()
    centres = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    w0 = p.cumsum(0)
    m0 = (p * centres).cumsum(0)
    mean = m0[-1]
    between = (mean * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    return float((int(between[:-1].argmax()) + 1) / bins)


def _dilate(mask: Tensor, cross: bool) -> Tensor:
    """One dilation of a ``[h, w]`` bool mask, 8-connected (3x3) or 4-connected (cross)."""
    if not cross:
        return F.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    out = mask.clone()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def largest_component(mask: Tensor) -> Tensor:
    """The largest 8-connected component of a ``[h, w]`` bool mask (all False if empty).

    Labels spread by repeated 3x3 max-pooling within the mask until they settle: fine for
    the attention grids this is meant for (at most 64 x 64).
    """
    if not bool(mask.any()):
        return mask.clone()
    h, w = mask.shape
    inside = mask.float()
    labels = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(h, w) * inside
    while True:
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * inside
        if torch.equal(grown, labels):
            break
        labels = grown
    ids = labels.long().flatten()
    counts = torch.bincount(ids, minlength=h * w + 1)
    counts[0] = 0
    return labels.long() == int(counts.argmax())


def fill_holes(mask: Tensor) -> Tensor:
    """Fill the background regions of a ``[h, w]`` bool mask that do not touch the border."""
    background = ~mask
    border = torch.zeros_like(mask)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    outside = background & border
    while True:
        grown = _dilate(outside, cross=True) & background
        if torch.equal(grown, outside):
            break
        outside = grown
    return ~outside


@attrs.frozen
class AttentionSegmenter:
    """The subject is where the subject tokens look: Figure 3's cross-attention maps, binarised.

    For each image the averaged subject-token attention ``[h, w]`` is rescaled to [0, 1],
    thresholded with Otsu's method (no tuned constant: the map's own histogram decides), and
    cleaned: the largest 8-connected component is kept (stray cells where a token also
    looks) and its holes are filled (a subject is one solid region). The mask is then
    resized to the image bilinearly and cut at 0.5, which keeps its outline smooth.

    A map whose spread ``max - min`` is at most ``min_contrast`` (2%) of its maximum attends
    everywhere alike (Figure 3 at step 50): no subject, an empty mask. The bar is low on
    purpose: Otsu still finds a weak peak; only a flat map has nothing to find.
    """

    min_contrast: float = 0.02
    bins: int = 64
    name: str = "attention"
    wants_attention: bool = True

    def segment(self, images: Tensor, class_name: str, attention: Tensor | None = None) -> Tensor:
        if attention is None:
            raise HifiError(
                "the attention segmenter reads the subject tokens' cross-attention recorded while the image"
                " was generated, and none was recorded"
            )
        if attention.shape[0] != images.shape[0]:
            raise HifiError(f"{attention.shape[0]} attention maps for {images.shape[0]} images")
        masks = torch.stack([self.segment_map(a) for a in attention.float()])
        size = tuple(images.shape[-2:])
        return F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0] > 0.5

    def segment_map(self, attention: Tensor) -> Tensor:
        """One ``[h, w]`` attention map -> the cleaned bool mask on the same grid."""
        low, high = float(attention.min()), float(attention.max())
        if high <= 0 or high - low <= self.min_contrast * high:
            return torch.zeros_like(attention, dtype=torch.bool)
        scaled = ((attention - low) / (high - low)).cpu()
        mask = scaled >= otsu_threshold(scaled, self.bins)
        return fill_holes(largest_component(mask)).to(attention.device)


# Embedder --------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class VaeLatentEmbedder:
    """Pooled statistics of the backend's own VAE latents: an image embedding without extra weights.

    Why this: the reference is chosen so that Algorithm 2 "modifies {x_t} as little as
    possible" (Section 3.3), and the guidance acts on exactly these latents (x*_0 is the
    VAE encoding of the reference), so similarity in this space is similarity where it
    matters. The VAE encoder ships with every backend and costs one pass per image.
    Raw latents would compare pixel positions, so the embedding pools them: a spatial
    pyramid of average-pooled latents (1x1, 2x2, 4x4: colour and coarse layout, tolerant of
    the shifts that the similarity transform corrects anyway) and the channel covariance
    (a Gram matrix: texture, independent of position), each block L2-normalised so that
    none dominates the cosine. It sees colour and texture, not semantics as DINO does; a
    real DINO embedder plugs in through :class:`ImageEmbedder`.
    """

    backend: DenoiserBackend
    levels: tuple[int, ...] = (1, 2, 4)
    name: str = "vae-latent"

    def embed(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            latents = self.backend.encode_images(images).float()
        blocks = [F.adaptive_avg_pool2d(latents, level).flatten(1) for level in self.levels]
        flat = latents.flatten(2)
        centred = flat - flat.mean(dim=-1, keepdim=True)
        blocks.append((centred @ centred.transpose(1, 2) / flat.shape[-1]).flatten(1))
        return torch.cat([F.normalize(b, dim=-1) for b in blocks], dim=-1)


# Captioner -------------------------------------------------------------------------------


@attrs.frozen
class TemplateCaptioner:
    """The same caption for every image, ``"a photo of a <class>"`` by default."""

    template: str = "a photo of a {class_name}"
    name: str = "template"

    def caption(self, images: Tensor, class_name: str) -> list[str]:
        return [self.template.format(class_name=class_name)] * images.shape[0]
