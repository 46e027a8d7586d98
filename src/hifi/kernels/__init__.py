"""Pure tensor kernels: one function per equation of the paper.

- :mod:`hifi.kernels.ddim`: DDIM step and inverse step (Eq. 1, 3), the schedule value,
  the timestep grid, classifier-free guidance.
- :mod:`hifi.kernels.losses`: masked loss (Eq. 5), ridge-to-null regulariser (Eq. 6),
  the splice ``[c, c_s]``.
- :mod:`hifi.kernels.transform`: similarity-transform fit (Eq. 8, 9, Algorithm 4), warps.
- :mod:`hifi.kernels.latents`: masked latent substitution (Algorithm 2).
"""
