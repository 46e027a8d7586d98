"""Deterministic DDIM sampling (Eq. 1, Eq. 7) and DDIM inversion (Eq. 3) as plain loops.

The model is any callable ``model(x_t, t, cond) -> output`` (a backend's ``denoise``, or a
function with an exact answer in a test) and the schedule is a :class:`Schedule` value;
nothing here is tied to a scheduler object or a backend. No ``no_grad`` inside: the
reference-guidance and null-text loops differentiate through these steps; callers that
only sample wrap the call in ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from hifi.kernels.ddim import Alpha, Schedule, cfg_combine, ddim_inverse_step, ddim_step, ddim_timesteps

Model = Callable[[Tensor, int, Tensor], Tensor]
StepCallback = Callable[[int, int, Tensor], None]
"""``callback(i, t, x_{t-1})`` after denoising step i (0-based) at timestep t."""

__all__ = ["Model", "ddim_invert", "ddim_sample", "guided_output", "null_guided_step", "per_step"]


def guided_output(model: Model, x: Tensor, t: int, cond: Tensor, uncond: Tensor | None, w: float) -> Tensor:
    """The classifier-free-guided model output ``w*eps(x,c) + (1-w)*eps(x,phi)`` (Eq. 1).

    Both branches run as one batch ``[phi, c]`` (the order diffusers' pipelines use), and
    only the conditional branch when ``w == 1`` or there is no ``uncond``.
    """
    if uncond is None or w == 1.0:
        return model(x, t, cond)
    batch = x.shape[0]
    out = model(
        torch.cat([x, x]), t, torch.cat([uncond.expand(batch, -1, -1), cond.expand(batch, -1, -1)])
    )
    out_uncond, out_cond = out.chunk(2)
    return cfg_combine(out_cond, out_uncond, w)


def null_guided_step(
    model: Model, schedule: Schedule, x: Tensor, t: Tensor | int, alpha_t: Alpha, alpha_prev: Alpha,
    cond: Tensor, phi: Tensor, guidance: float, out_cond: Tensor | None = None,
) -> Tensor:
    """x_{t-1} = F^(t)(x_t, c, phi) as a function of the null embedding phi (Eq. 4 and Eq. 10).

    The step that null-text inversion's phi_t and Algorithm 2's phi_h are optimised through.
    Given ``out_cond`` = eps(x_t, c), which does not depend on phi, only the unconditional
    branch runs; without it both do (the naive way). ``t`` and the alphas may be tensors, so
    a captured graph or compiled step serves every timestep (:mod:`hifi.execution.fastpath`).
    """
    if out_cond is None:
        out = guided_output(model, x, t, cond, phi.to(x.dtype), guidance)  # type: ignore[arg-type]
    else:
        out = cfg_combine(out_cond, model(x, t, phi.to(x.dtype)), guidance)  # type: ignore[arg-type]
    return ddim_step(out, x, alpha_t, alpha_prev, schedule.prediction_type, schedule.clip_sample_range)


def per_step(cond: Tensor | Sequence[Tensor], num_steps: int) -> Sequence[Tensor]:
    """One embedding per denoising step: a single tensor repeated, or a sequence checked for length."""
    if isinstance(cond, Tensor):
        return [cond] * num_steps
    if len(cond) != num_steps:
        raise ValueError(f"got {len(cond)} step-wise conditions for {num_steps} steps")
    return cond


def ddim_sample(
    model: Model,
    schedule: Schedule,
    x_T: Tensor,
    cond: Tensor | Sequence[Tensor],
    *,
    uncond: Tensor | Sequence[Tensor] | None = None,
    guidance: float = 7.5,
    num_steps: int = 50,
    callback: StepCallback | None = None,
) -> Tensor:
    """Denoise x_T to x_0 with N deterministic DDIM steps, x_{t-1} = F^(t)(x_t, c, phi) (Eq. 1).

    ``cond`` is one text embedding for every step, or one per step in denoising order:
    the step-wise ``[c, c_s^t]`` of Eq. 7. ``uncond`` likewise: phi, or one phi_t per step
    (the learned null embeddings of null-text inversion, Eq. 4).
    """
    timesteps = ddim_timesteps(schedule, num_steps)
    stride = schedule.stride(num_steps)
    conds = per_step(cond, num_steps)
    unconds = per_step(uncond, num_steps) if uncond is not None else [None] * num_steps
    x = x_T
    for i, t in enumerate(timesteps):
        out = guided_output(model, x, t, conds[i], unconds[i], guidance)
        x = ddim_step(
            out, x, schedule.alpha(t), schedule.alpha(t - stride), schedule.prediction_type,
            schedule.clip_sample_range,
        )
        if callback is not None:
            callback(i, t, x)
    return x


def ddim_invert(
    model: Model,
    schedule: Schedule,
    x_0: Tensor,
    cond: Tensor,
    *,
    uncond: Tensor | None = None,
    guidance: float = 1.0,
    num_steps: int = 50,
) -> list[Tensor]:
    """DDIM inversion x_0 -> x_T, x_{t+1} = F^-1(t)(x_t, c) (Eq. 3); the whole trajectory.

    Returns ``[x*_0, x*_1, ..., x*_T]`` (index k is the latent after k inversion steps, so
    ``trajectory[k]`` sits at the k-th smallest timestep of the grid). The model is
    evaluated at the current latent and the target timestep, as diffusers'
    ``DDIMInverseScheduler`` and null-text inversion do. Guidance 1 (the default) is the
    pivotal inversion of null-text inversion.
    """
    timesteps = ddim_timesteps(schedule, num_steps)[::-1]
    stride = schedule.stride(num_steps)
    trajectory = [x_0]
    x = x_0
    for t in timesteps:
        out = guided_output(model, x, t, cond, uncond, guidance)
        x = ddim_inverse_step(out, x, schedule.alpha(t - stride), schedule.alpha(t), schedule.prediction_type)
        trajectory.append(x)
    return trajectory
