"""The weight-free perception models, so that reference-guided generation runs on any backend.

They implement the protocols of :mod:`hifi.protocols.perception` and need no weights
beyond the backend's own:

- :class:`AttentionSegmenter`: the cross-attention maps of the subject tokens recorded
  while I_g1 was generated (Figure 3: late in denoising the c_s tokens are attended by the
  subject's regions), thresholded (Otsu) and cleaned (largest component, holes filled).
- :class:`FolderSegmenter`: masks read from a folder instead of computed.
- :class:`VaeLatentEmbedder`: pooled statistics of the backend's own VAE latents.
- :class:`TemplateCaptioner`: ``"a photo of a <class>"``.

The source photos need no segmenter: their masks are the ones the run was tuned with.

:func:`hifi.algorithms.attention.observed_attention` records cross-attention without
changing a single number of the computation, so that I_g1 drawn while recording is exactly
the plain Eq. 7 image; :func:`subject_attention` reads the subject tokens' maps from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from hifi.algorithms.attention import AttentionStore
from hifi.errors import HifiError
from hifi.io.images import list_images, load_image, mask_to_tensor
from hifi.kernels.morphology import fill_holes, largest_component, otsu_threshold
from hifi.kernels.similarity import unit_rows
from hifi.protocols.denoiser import DenoiserBackend
from hifi.protocols.perception import Perception

__all__ = [
    "AttentionSegmenter",
    "FolderSegmenter",
    "TemplateCaptioner",
    "VaeLatentEmbedder",
    "default_perception",
    "subject_attention",
]


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


# Segmenters ------------------------------------------------------------------------------


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


@attrs.frozen
class FolderSegmenter:
    """Masks read from a folder instead of computed: one mask image per photo, same file stem.

    ``names`` picks the masks (in order) for the images of each :meth:`segment` call;
    without it every mask in the folder is used, sorted by file name. Any non-black
    pixel is subject; masks are resized (nearest) to the images.
    """

    folder: Path
    names: tuple[str, ...] | None = None
    name: str = "folder"
    wants_attention: bool = False

    def segment(self, images: Tensor, class_name: str, attention: Tensor | None = None) -> Tensor:
        files = {f.stem: f for f in list_images(self.folder)}
        names = self.names if self.names is not None else tuple(sorted(files))
        missing = [n for n in names if n not in files]
        if missing:
            raise HifiError(f"no mask for {', '.join(missing)} in {self.folder}")
        if len(names) != images.shape[0]:
            raise HifiError(f"{len(names)} masks in {self.folder} for {images.shape[0]} images")
        h, w = images.shape[-2:]
        masks = torch.stack([mask_to_tensor(load_image(files[n], "L"), max(h, w)) for n in names])
        masks = F.interpolate(masks[:, None], size=(h, w), mode="nearest")[:, 0]
        return (masks > 0.5).to(images.device)


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
    real DINO embedder plugs in through :class:`~hifi.protocols.perception.ImageEmbedder`.
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
        return torch.cat([unit_rows(b) for b in blocks], dim=-1)


# Captioner -------------------------------------------------------------------------------


@attrs.frozen
class TemplateCaptioner:
    """The same caption for every image, ``"a photo of a <class>"`` by default."""

    template: str = "a photo of a {class_name}"
    name: str = "template"

    def caption(self, images: Tensor, class_name: str) -> list[str]:
        return [self.template.format(class_name=class_name)] * images.shape[0]
