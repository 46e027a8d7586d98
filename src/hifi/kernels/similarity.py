"""Cosine similarity of embeddings: rows to unit length, then dot products.

The one place the scores of Section 3.3 and of the evaluation are computed: the reference
photo is the source of highest cosine to I_g1; the DINO and CLIP-I scores are means of
:func:`cosine_similarity_matrix`, CLIP-T its diagonal over image-prompt pairs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from hifi.errors import HifiError

__all__ = ["cosine_similarity_matrix", "unit_rows"]


def unit_rows(x: Tensor) -> Tensor:
    """``x`` ``[..., D]`` as float32 with every row L2-normalised (a zero row stays zero)."""
    return F.normalize(x.float(), dim=-1)


def cosine_similarity_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarities ``[N, M]`` of rows ``a`` ``[N, D]`` and ``b`` ``[M, D]`` (float32, on ``a``'s device).

    Rows are L2-normalised (:func:`unit_rows`), then ``a @ b.T``: the DINO and CLIP-I scores
    are means of it, CLIP-T its diagonal over image-prompt pairs.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise HifiError(f"cosine similarity needs [N, D] and [M, D] embeddings, got {tuple(a.shape)}, {tuple(b.shape)}")
    return unit_rows(a) @ unit_rows(b.to(a.device)).T
