"""Denoiser backends for ``hifi``: each implements :class:`hifi.protocols.DenoiserBackend`.

- ``tiny``: random tiny components built from configs on the CPU (the test suite's model).
- ``sd14``: Stable Diffusion 1.x / 2.x from a local diffusers folder or hub id, fp32.
- ``sd14-fp16``: the same weights in fp16 or bf16 with a selectable attention kernel.
- ``sdxl``, ``sdxl-fp16``: Stable Diffusion XL base, the same way; ``tiny-sdxl``: a random tiny SDXL.
- ``toy``: ToyWorld's trained model, bundled.

This package imports ``hifi``; ``hifi`` finds these through the ``hifi.backends`` entry
points and never imports this package.
"""

from hifi_backends.diffusers_backend import DiffusersBackend

__all__ = ["DiffusersBackend"]
