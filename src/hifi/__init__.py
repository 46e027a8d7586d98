"""hifi: HiFi Tuner, high-fidelity subject-driven fine-tuning for diffusion models.

The public API: kernels (:mod:`hifi.kernels`), algorithms (:mod:`hifi.algorithms`),
the :class:`DenoiserBackend` protocol, the execution edge (:mod:`hifi.execution`),
workflows (:mod:`hifi.workflows`) and the backend registry.
"""

from hifi.errors import HifiError, ModelNotFoundError
from hifi.kernels.ddim import DdimGrid, Schedule, ddim_inverse_step, ddim_step, ddim_timesteps
from hifi.protocols.denoiser import DenoiserBackend
from hifi.registry import available_backends, load_backend, register_backend

__version__ = "0.1.0"

__all__ = [
    "DdimGrid",
    "DenoiserBackend",
    "HifiError",
    "ModelNotFoundError",
    "Schedule",
    "__version__",
    "available_backends",
    "ddim_inverse_step",
    "ddim_step",
    "ddim_timesteps",
    "load_backend",
    "register_backend",
]
