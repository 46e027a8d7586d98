"""Deterministic DDIM: the guided step F^(t) (Eq. 1), its inverse (Eq. 3), and their loops (Eq. 7).

The model is any callable ``model(x_t, t, cond) -> output`` (:data:`hifi.protocols.denoiser.Model`:
a backend's ``denoise``, a compiled or graph-replaying wrapper of it, or a function with an
exact answer in a test) and the steps come from a :class:`~hifi.kernels.ddim.DdimGrid` built
once; nothing here is tied to a scheduler object, a backend or an execution mode. No ``no_grad`` inside:
the reference-guidance and null-text loops differentiate through :func:`guided_ddim_step`;
callers that only sample wrap the call in ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from hifi.kernels.condition import Condition
from hifi.kernels.ddim import DdimGrid, DdimStep, Timestep, cfg_combine, ddim_inverse_step, ddim_step
from hifi.protocols.denoiser import Model

StepCallback = Callable[[int, int, Tensor], None]
"""``callback(i, t, x_{t-1})`` after denoising step i (0-based) at timestep t."""

__all__ = [
    "StepCallback",
    "ddim_invert",
    "ddim_sample",
    "guided_ddim_step",
    "guided_output",
    "inverse_ddim_step",
    "per_step",
]


def guided_output(model: Model, x: Tensor, t: Timestep | Tensor, cond: Condition, uncond: Condition | None,
                  w: float) -> Tensor:
    """The classifier-free-guided model output ``w*eps(x,c) + (1-w)*eps(x,phi)`` (inside Eq. 1).

    Both branches run as one batch ``[phi, c]`` (the order diffusers' pipelines use), and
    only the conditional branch when ``w == 1`` or there is no ``uncond``.
    """
    if uncond is None or w == 1.0:
        return model(x, t, cond)
    batch = x.shape[0]
    out = model(torch.cat([x, x]), t, Condition.cat([uncond.expand(batch), cond.expand(batch)]))
    out_uncond, out_cond = out.chunk(2)
    return cfg_combine(out_cond, out_uncond, w)


def guided_ddim_step(
    model: Model, grid: DdimGrid, x: Tensor, step: DdimStep, cond: Condition, phi: Condition | None, w: float,
    out_cond: Tensor | None = None,
) -> Tensor:
    """Eq. 1: ``x_{t-1} = F^(t)(x_t, c, phi) = beta_t x_t - gamma_t (w eps(x_t, c) + (1 - w) eps(x_t, phi))``.

    The one home of F^(t): sampling, null-text inversion (Eq. 4) and reference guidance
    (Eq. 10) all take their steps through it. Given ``out_cond`` = eps(x_t, c), which does
    not depend on phi, only the unconditional branch runs (what the phi_t and phi_h steps
    differentiate); without it both run as one batch. ``step`` may hold tensors
    (:meth:`~hifi.kernels.ddim.DdimStep.on`), so one captured graph serves every timestep.
    """
    if out_cond is None:
        out = guided_output(model, x, step.t, cond, None if phi is None else phi.to(dtype=x.dtype), w)
    else:
        assert phi is not None, "the unconditional branch needs phi"
        out = cfg_combine(out_cond, model(x, step.t, phi.to(dtype=x.dtype)), w)
    schedule = grid.schedule
    return ddim_step(out, x, step.level, step.level_prev, schedule.prediction_type, schedule.clip_sample_range)


def inverse_ddim_step(
    model: Model, grid: DdimGrid, x: Tensor, step: DdimStep, cond: Condition, uncond: Condition | None = None,
    w: float = 1.0,
) -> Tensor:
    """Eq. 3: ``x_t = F^-1(t)(x_{t-1}, c)``, the DDIM map of ``step`` run towards more noise.

    The model is evaluated at the current latent and the target timestep, as diffusers'
    ``DDIMInverseScheduler`` and null-text inversion do.
    """
    out = guided_output(model, x, step.t, cond, uncond, w)
    return ddim_inverse_step(out, x, step.level_prev, step.level, grid.schedule.prediction_type)


def per_step(cond: Condition | Sequence[Condition], num_steps: int) -> Sequence[Condition]:
    """One condition per denoising step: a single one repeated, or a sequence checked for length."""
    if isinstance(cond, Condition):
        return [cond] * num_steps
    if len(cond) != num_steps:
        raise ValueError(f"got {len(cond)} step-wise conditions for {num_steps} steps")
    return cond


def ddim_sample(
    model: Model,
    grid: DdimGrid,
    x_T: Tensor,
    cond: Condition | Sequence[Condition],
    *,
    uncond: Condition | Sequence[Condition] | None = None,
    guidance: float = 7.5,
    callback: StepCallback | None = None,
) -> Tensor:
    """Denoise x_T to x_0 along ``grid``, x_{t-1} = F^(t)(x_t, c, phi) (Eq. 1).

    ``cond`` is one text condition for every step, or one per step in denoising order:
    the step-wise ``[c, c_s^t]`` of Eq. 7. ``uncond`` likewise: phi, or one phi_t per step
    (the learned null embeddings of null-text inversion, Eq. 4).
    """
    conds = per_step(cond, grid.num_steps)
    unconds = per_step(uncond, grid.num_steps) if uncond is not None else [None] * grid.num_steps
    x = x_T
    for i, step in enumerate(grid.steps):
        x = guided_ddim_step(model, grid, x, step, conds[i], unconds[i], guidance)
        if callback is not None:
            callback(i, int(step.t), x)
    return x


def ddim_invert(
    model: Model,
    grid: DdimGrid,
    x_0: Tensor,
    cond: Condition,
    *,
    uncond: Condition | None = None,
    guidance: float = 1.0,
) -> list[Tensor]:
    """DDIM inversion x_0 -> x_T along ``grid``, x_{t+1} = F^-1(t)(x_t, c) (Eq. 3); the whole trajectory.

    Returns ``[x*_0, x*_1, ..., x*_T]`` (index k is the latent after k inversion steps, so
    ``trajectory[k]`` sits at the k-th smallest timestep of the grid). Guidance 1 (the
    default) is the pivotal inversion of null-text inversion.
    """
    trajectory = [x_0]
    x = x_0
    for step in grid.inversion():
        x = inverse_ddim_step(model, grid, x, step, cond, uncond, guidance)
        trajectory.append(x)
    return trajectory
