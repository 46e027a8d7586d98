"""What the algorithms need from a model and from perception models, as narrow protocols.

:mod:`hifi.protocols.denoiser`: the :class:`DenoiserBackend` and the optional capabilities
a backend may declare. The core defines these; ``hifi_backends`` implements them.
"""

from hifi.protocols.denoiser import DenoiserBackend

__all__ = ["DenoiserBackend"]
