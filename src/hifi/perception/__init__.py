"""Perception for reference-guided generation (Section 3.3): find the subject, compare photos, caption them.

The protocols are in :mod:`hifi.protocols.perception` (re-exported here with the
weight-free models, the names most callers want). One job per module:

- :mod:`hifi.perception.builtin`: the weight-free models (attention and folder segmenters,
  VAE-latent embedder, template captioner), :func:`subject_attention`, :func:`default_perception`;
- :mod:`hifi.perception.registry`: models by name (built in, entry points, registered at run
  time) and :func:`~hifi.perception.registry.configured_perception`;
- :mod:`hifi.perception.masks`: subject masks of the source photos (``--masks auto``);
- :mod:`hifi.perception.models`: the environment variables, model slots and bundled models,
  and where a model source is on this machine;
- :mod:`hifi.perception.doctor`: the report of ``hifi doctor``.
"""

from hifi.perception.builtin import (
    AttentionSegmenter,
    FolderSegmenter,
    TemplateCaptioner,
    VaeLatentEmbedder,
    default_perception,
    subject_attention,
)
from hifi.protocols.perception import Captioner, ImageEmbedder, Perception, Segmenter

__all__ = [
    "AttentionSegmenter",
    "Captioner",
    "FolderSegmenter",
    "ImageEmbedder",
    "Perception",
    "Segmenter",
    "TemplateCaptioner",
    "VaeLatentEmbedder",
    "default_perception",
    "subject_attention",
]
