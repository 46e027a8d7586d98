"""What the algorithms need from a model and from perception models, as narrow protocols.

:mod:`hifi.protocols.denoiser`: the :class:`DenoiserBackend` and the optional capabilities
a backend may declare. :mod:`hifi.protocols.perception`: the :class:`Segmenter`,
:class:`ImageEmbedder` and :class:`Captioner` of reference guidance, the :class:`Perception`
that holds them, and the optional :class:`PerceptionPreferences` of a backend. The core
defines these; ``hifi_backends`` implements them.
"""

from hifi.protocols.denoiser import DenoiserBackend
from hifi.protocols.perception import Captioner, ImageEmbedder, Perception, PerceptionPreferences, Segmenter

__all__ = ["Captioner", "DenoiserBackend", "ImageEmbedder", "Perception", "PerceptionPreferences", "Segmenter"]
