"""Plain subject-driven generation: x_{t-1} = F^(t)(x_t, [c, c_s^t], phi) (Eq. 7).

The reference-guided generation of Algorithm 2 starts from the same x_T and the same
per-step conditions (see :mod:`hifi.algorithms.reference`).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

from hifi.algorithms.sampling import StepCallback, ddim_sample
from hifi.algorithms.subject import Subject
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import DdimGrid
from hifi.protocols.denoiser import DenoiserBackend, Model

__all__ = ["Generation", "generate", "initial_noise", "step_conditions"]


def initial_noise(backend: DenoiserBackend, seeds: Sequence[int]) -> Tensor:
    """x_T for each seed, drawn on the CPU (the same on every device), ``[B, C, h, w]``."""
    side = backend.resolution // backend.vae_scale_factor
    noise = [
        torch.randn(1, backend.latent_channels, side, side, generator=torch.Generator().manual_seed(int(s)))
        for s in seeds
    ]
    return torch.cat(noise).to(device=backend.device, dtype=backend.dtype)


def step_conditions(backend: DenoiserBackend, subject: Subject, prompt: str, grid: DdimGrid) -> list[Condition]:
    """The text condition of every DDIM step, ``[c, c_s^t]`` for t = T..1 (Eq. 7)."""
    c = subject.encode(backend, [prompt])
    return subject.conditions(c, grid.timesteps)


@attrs.frozen(eq=False)
class Generation:
    """Generated images ``[B, 3, H, W]`` in [-1, 1], their final latents, and the seeds."""

    images: Tensor
    latents: Tensor
    seeds: tuple[int, ...]
    prompt: str


def generate(
    backend: DenoiserBackend,
    subject: Subject,
    prompt: str,
    seeds: Sequence[int],
    *,
    guidance: float = 7.5,
    num_steps: int = 50,
    callback: StepCallback | None = None,
    model: Model | None = None,
) -> Generation:
    """Eq. 7: draw one image per seed, ``x_{t-1} = F^(t)(x_t, [c, c_s^t], phi)``, no gradients.

    ``model`` is the denoiser callable, ready from the edge (default ``backend.denoise``; a
    compiled or graph-replaying one from :class:`hifi.execution.edge.Execution` gives the
    same images within tolerance).
    """
    model = model or backend.denoise
    grid = DdimGrid.build(backend.schedule, num_steps)
    with torch.no_grad():
        x_T = initial_noise(backend, seeds)
        conds = step_conditions(backend, subject, prompt, grid)
        x0 = ddim_sample(model, grid, x_T, conds, uncond=backend.null_embedding(), guidance=guidance,
                         callback=callback)
        images = backend.decode_latents(x0)
    return Generation(images=images, latents=x0, seeds=tuple(int(s) for s in seeds), prompt=prompt)
