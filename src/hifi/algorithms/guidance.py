"""Reference-guided denoising (Section 3.3): Algorithm 2 and its loss, Eq. 10.

Step indices. Algorithm 2 counts its denoising loop ``t = T, ..., 1``, and t_s, t_e are
such indices: step ``t`` is the ``(T - t + 1)``-th denoising step, taken at the DDIM grid's
step ``grid.steps[T - t]``; it maps x_t to x_{t-1}, and x*_t is ``trajectory[t]``. With
T = 50, t_s = 40 and t_e = 10 (the paper's values) the guidance runs from the 11th
denoising step to the 41st, 31 steps. The stages that prepare its inputs (I_g1, the masks,
the reference and its trajectory) are in :mod:`hifi.algorithms.reference`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

from hifi.algorithms.sampling import StepCallback, guided_ddim_step, per_step
from hifi.errors import HifiError
from hifi.execution.edge import Bound, StepFactory, adam_steps
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import DdimGrid, DdimStep, Level, Timestep, timestep_number
from hifi.kernels.latents import substitute_masked
from hifi.kernels.losses import masked_mse_per_sample
from hifi.protocols.denoiser import Model

__all__ = [
    "GuidedSample",
    "StepLosses",
    "check_guidance_window",
    "reference_guidance_loss",
    "reference_guided_sample",
]


def check_guidance_window(num_steps: int, t_start: int, t_end: int, phi_steps: int, phi_lr: float = 1e-2) -> None:
    """Refuse a guidance window Algorithm 2 cannot run: ``1 <= t_e <= t_s <= T``, ``J >= 0``, ``lr > 0``."""
    if num_steps < 1:
        raise HifiError(f"the number of DDIM steps T must be at least 1, got {num_steps}")
    for name, value in (("t_s (--t-start)", t_start), ("t_e (--t-end)", t_end)):
        if not 1 <= value <= num_steps:
            raise HifiError(f"{name} must be a denoising step index in 1..T = 1..{num_steps}, got {value}")
    if t_start < t_end:
        raise HifiError(
            f"t_s = {t_start} is below t_e = {t_end}: guidance runs from step t_s down to step t_e,"
            " so t_s must be at least t_e"
        )
    if phi_steps < 0:
        raise HifiError(f"the phi_h steps per denoising step J (--phi-steps) must be >= 0, got {phi_steps}")
    if not math.isfinite(phi_lr):
        raise HifiError(f"--phi-lr must be a finite number, got {phi_lr}")
    if phi_steps > 0 and not phi_lr > 0:
        raise HifiError(f"the phi_h learning rate (--phi-lr) must be positive, got {phi_lr}")


def reference_guidance_loss(
    model: Model, grid: DdimGrid, guidance: float, phi_h: Tensor, x: Tensor, t: Tensor, level: Level,
    level_prev: Level, c: Condition, null: Condition, target: Tensor, weight: Tensor, *out_cond: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 10: ``L_h^(t)(phi_h) = || x*_{t-1}[M] - F^(t)(x_t, [c, c_s^t], phi_h)[M] ||^2``, that F^(t), and
    each image's L_h.

    Each image's loss is a mean over its own masked latents
    (:func:`~hifi.kernels.losses.masked_mse_per_sample`, ``weight`` is M_r* as floats
    ``[B, 1, h, w]``), in float32; the loss minimised is their sum, so that B images (each
    its phi_h, a row of ``phi_h`` ``[B, L, D]``) optimised together keep their own gradients
    and, Adam being elementwise, their own updates: each image as if alone. ``phi_h`` is a sequence in the place of
    phi's (``null``), whose extras it keeps (:mod:`hifi.kernels.condition`). A function of
    tensors (and conditions) only after its three fixed arguments, so that a step runner
    can capture it once for every step and image. ``out_cond`` (optional) is
    eps(x_t, [c, c_s^t]), which does not depend on phi_h.
    """
    x_guided = guided_ddim_step(model, grid, x, DdimStep(t, level, level_prev), c, null.with_sequence(phi_h),
                                guidance, *out_cond).float()
    per_image = masked_mse_per_sample(x_guided, target, weight)
    return per_image.sum(), x_guided, per_image


@attrs.frozen
class StepLosses:
    """Eq. 10 at one guided step: the loss before each of the J phi_h updates, then after the last."""

    step: int
    timestep: Timestep
    losses: tuple[float, ...]


@attrs.frozen(eq=False)
class GuidedSample:
    """Algorithm 2's x_0 ``[B, C, h, w]`` and, for each image, the phi_h losses of every guided step (t_s to t_e)."""

    latents: Tensor
    image_losses: tuple[tuple[StepLosses, ...], ...]

    @property
    def losses(self) -> tuple[StepLosses, ...]:
        """The first image's losses (of a batch of one, the only image's)."""
        return self.image_losses[0]


def reference_guided_sample(
    model: Model,
    grid: DdimGrid,
    x_T: Tensor,
    cond: Condition | Sequence[Condition],
    trajectory: Sequence[Tensor],
    mask: Tensor,
    *,
    uncond: Condition,
    guidance: float = 7.5,
    t_start: int = 40,
    t_end: int = 10,
    phi_steps: int = 10,
    phi_lr: float = 1e-2,
    naive: bool = False,
    callback: StepCallback | None = None,
    optimiser: StepFactory = adam_steps,
) -> GuidedSample:
    """Algorithm 2: denoise x_T with Eq. 7, guided inside M_r* by the reference trajectory.

    For t = T, ..., 1 (step indices, see the module docstring): at t = t_s the latents under
    ``mask`` are taken from x*_t; every step takes x_{t-1} = F^(t)(x_t, [c, c_s^t], phi); for
    t_s >= t >= t_e, phi_h takes ``phi_steps`` (J) Adam steps on Eq. 10
    (:func:`reference_guidance_loss`), and then x_{t-1}[M] = F^(t)(x_t, [c, c_s^t], phi_h)[M].
    phi_h starts as phi's sequence (``uncond``) at t_s and carries over, with its Adam state, from step
    to step. ``mask`` is boolean ``[1 or B, 1, h, w]``; ``trajectory`` is ``[x*_0, ..., x*_T]``;
    ``cond`` one condition or one per step (``[c, c_s^t]``).

    Batches: ``x_T`` ``[B, C, h, w]`` with ``trajectory`` of ``[B, ...]`` latents and ``mask``
    ``[B, 1, h, w]`` (each image its reference, mask and trajectory) runs B images in one
    loop, one phi_h each, optimised together by :func:`reference_guidance_loss` (each image
    as if alone, within rounding; tested).

    Cost: within a step the conditional branch eps(x_t, [c, c_s^t]) does not depend on
    phi_h, so it is computed once, without gradients (it also serves the step with phi),
    and each phi_h step differentiates the unconditional branch alone. ``naive=True``
    instead recomputes both branches with gradients at every phi_h step, as a literal
    reading does; the result is the same. phi_h is float32 whatever the model's dtype.
    ``model`` and ``optimiser`` arrive ready from the edge (:mod:`hifi.execution.edge`);
    the losses are read back once, after the loop.
    """
    num_steps = grid.num_steps
    check_guidance_window(num_steps, t_start, t_end, phi_steps, phi_lr)
    if len(trajectory) != num_steps + 1:
        raise HifiError(
            f"the reference trajectory has {len(trajectory)} latents; Algorithm 2 needs T + 1 = {num_steps + 1}"
        )
    if mask.dtype != torch.bool or not bool(mask.any()):
        raise HifiError("the guidance mask M_r* must be a non-empty boolean latent mask")
    conds = per_step(cond, num_steps)
    batch = x_T.shape[0]
    if mask.shape[0] not in (1, batch) or not bool(mask.flatten(1).any(dim=1).all()):  # one read-back
        raise HifiError(f"the guidance mask must be [1 or B = {batch}, 1, h, w], each image's non-empty")
    weight = mask.float().expand(batch, 1, *mask.shape[-2:])
    loss_fn = Bound(reference_guidance_loss, model, grid, guidance)
    # phi_h starts as phi at t_s and carries over, with its Adam state, from step to step; one row per image.
    runner = optimiser(loss_fn, uncond.sequence.expand(batch, *uncond.sequence.shape[1:]), phi_lr)
    step_losses: list[tuple[int, Timestep, Tensor]] = []  # read back once, after the loop
    x = x_T.detach()
    for i, step in enumerate(grid.steps):
        index = num_steps - i
        guided = t_end <= index <= t_start
        if index == t_start:
            x = substitute_masked(x, trajectory[index].to(x.dtype), mask)
        with torch.no_grad():
            out_cond = model(x, step.t, conds[i]) if guided else None
            x_prev = guided_ddim_step(model, grid, x, step, conds[i], uncond, guidance, out_cond)
        if guided:
            on = step.on(x.device)
            inputs = (x, on.t, on.level, on.level_prev, conds[i], uncond, trajectory[index - 1].float(), weight,
                      *(() if naive or out_cond is None else (out_cond,)))
            losses = [runner(*inputs)[2] for _ in range(phi_steps)]  # J Adam steps on Eq. 10
            with torch.no_grad():
                _, x_guided, loss = loss_fn(runner.param, *inputs)
            x_prev = torch.where(mask, x_guided.to(x_prev.dtype), x_prev)
            step_losses.append((index, timestep_number(step.t), torch.stack([*losses, loss], dim=1)))  # [B, J + 1]
        x = x_prev
        if callback is not None:
            callback(i, int(step.t), x)
    read = [(index, t, values.tolist()) for index, t, values in step_losses]
    records = tuple(tuple(StepLosses(step=index, timestep=t, losses=tuple(values[b])) for index, t, values in read)
                    for b in range(batch))
    return GuidedSample(latents=x, image_losses=records)
