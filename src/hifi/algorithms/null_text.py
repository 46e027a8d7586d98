"""Null-text inversion (Mokady et al.; Section 3.1, Eq. 3 and 4; the first loops of Algorithm 3).

1. Pivotal inversion: DDIM-invert x_0 under its caption c with w = 1 (Eq. 3), giving the
   trajectory ``[x*_0, ..., x*_T]``.
2. Null-text optimisation: from x_T = x*_T, for each denoising step t = T..1 optimise a
   null embedding phi_t with K Adam steps on

       L_h^(t)(phi_t) = || x*_{t-1} - F^(t)(x_t, c, phi_t) ||^2              (Eq. 4)

   (a mean squared error), starting from the previous step's phi_{t+1}* (phi_T = phi),
   then take the guided step x_{t-1} = F^(t)(x_t, c, phi_t*). The conditional branch
   eps(x_t, c) does not depend on phi_t: it is computed once per step without gradients,
   and only the unconditional branch is differentiated.

Guided denoising with the learned ``phi_t*`` (:func:`null_text_sample`) then retraces the
inverted trajectory, where plain guided DDIM from x*_T drifts away from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hifi.algorithms.sampling import StepCallback, ddim_invert, ddim_sample, guided_ddim_step
from hifi.errors import HifiError
from hifi.execution.edge import Bound, StepFactory, adam_steps
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import DdimGrid, DdimStep, Level
from hifi.protocols.denoiser import Model

__all__ = ["NullTextConfig", "NullTextInversion", "null_text_inversion", "null_text_inversions", "null_text_loss",
           "null_text_sample"]


@attrs.frozen
class NullTextConfig:
    """Settings of null-text inversion; the defaults are the null-text paper's.

    Attributes:
        guidance: the guidance weight w of Eq. 1 that the phis are learned for.
        num_steps: DDIM steps T.
        inner_steps: K, the most Adam updates of phi_t per step.
        lr: Adam's learning rate.
        tolerance: a step stops early once Eq. 4 is below this.
        naive: recompute the conditional branch, with gradients, in every update (the
            way the loop is often written; for benchmarks: same result, more work).
    """

    guidance: float = 7.5
    num_steps: int = 50
    inner_steps: int = 10
    lr: float = 1e-2
    tolerance: float = 1e-5
    naive: bool = False

    def __attrs_post_init__(self) -> None:
        for flag, value in (("--guidance", self.guidance), ("--lr", self.lr), ("--tolerance", self.tolerance)):
            if not math.isfinite(value):
                raise HifiError(f"{flag} must be a finite number, got {value}")
        if self.num_steps < 1 or self.inner_steps < 0 or self.lr <= 0 or self.tolerance < 0:
            raise HifiError(
                f"null-text inversion needs num_steps >= 1, inner_steps >= 0, lr > 0 and tolerance >= 0"
                f" (got {self.num_steps}, {self.inner_steps}, {self.lr}, {self.tolerance})"
            )


@attrs.frozen(eq=False)
class NullTextInversion:
    """What null-text inversion learns about one image.

    Attributes:
        trajectory: the pivotal inversion ``[x*_0, ..., x*_T]`` (Eq. 3).
        phis: phi_t* for each DDIM step in denoising order (t = T..1): phi with its sequence
            ``[1, L, D]`` learned (its extras, e.g. SDXL's pooled part, are phi's).
        reconstruction: x_0 of the guided denoising with ``phis`` from x*_T.
        losses: Eq. 4 at each step's last evaluation (after its updates).
        iterations: Adam updates taken at each step (K, or fewer after early stopping).
        cond: the caption's condition c (batch 1).
        guidance: the guidance weight w the phis were learned for.
    """

    trajectory: tuple[Tensor, ...]
    phis: tuple[Condition, ...]
    reconstruction: Tensor
    losses: tuple[float, ...]
    iterations: tuple[int, ...]
    cond: Condition
    guidance: float

    @property
    def num_steps(self) -> int:
        return len(self.phis)

    @property
    def x_T(self) -> Tensor:
        return self.trajectory[-1]


def null_text_loss(
    model: Model, grid: DdimGrid, guidance: float, phi: Tensor, x: Tensor, t: Tensor, level: Level,
    level_prev: Level, cond: Condition, null: Condition, target: Tensor, *out_cond: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 4: ``L_h^(t)(phi_t) = || x*_{t-1} - F^(t)(x_t, c, phi_t) ||^2`` (a mean), that x_{t-1}, and each image's.

    ``phi`` is phi_t's sequence (``[B, L, D]``: one per image of a batch); ``null`` the null
    condition whose extras it keeps (:mod:`hifi.kernels.condition`). The loss minimised is the
    sum of the images' means, so each image keeps its own gradient (and, Adam being
    elementwise, its own updates); for one image it is the mean. A function of tensors (and
    conditions) only, after its three fixed arguments, so that an optimiser-step runner
    (:mod:`hifi.execution`) can capture it once and replay it at every step and for every
    image. ``out_cond`` (optional) is eps(x_t, c), computed once per step without gradients
    (:func:`~hifi.algorithms.sampling.guided_ddim_step`).
    """
    step = DdimStep(t, level, level_prev)
    x_prev = guided_ddim_step(model, grid, x, step, cond, null.with_sequence(phi), guidance, *out_cond)
    per_image = (x_prev.float() - target).pow(2).flatten(1).mean(dim=1)
    return per_image.sum(), x_prev, per_image


def null_text_inversion(
    model: Model,
    grid: DdimGrid,
    x_0: Tensor,
    cond: Condition,
    uncond: Condition,
    config: NullTextConfig | None = None,
    *,
    optimiser: StepFactory = adam_steps,
    progress: bool = False,
) -> NullTextInversion:
    """Invert ``x_0`` ``[1, C, h, w]`` under caption ``cond`` and learn one phi_t per step (Eq. 4).

    ``grid`` is the DDIM grid of ``config.num_steps`` steps; ``uncond`` is phi (batch 1),
    whose sequence is the start of phi_T. Each step takes at most K (``config.inner_steps``) Adam updates
    through ``optimiser`` and stops early once the loss is below ``config.tolerance``. phi
    is optimised in float32 whatever the model's dtype. ``model`` and ``optimiser`` arrive
    ready from the edge (eager, compiled or CUDA graphs: :mod:`hifi.execution.edge`).
    Several photos at once: :func:`null_text_inversions`.
    """
    if x_0.shape[0] != 1:
        raise HifiError(f"null_text_inversion takes one image [1, C, h, w]; use null_text_inversions for a batch of"
                        f" {x_0.shape[0]}")
    return null_text_inversions(model, grid, x_0, cond, uncond, config, optimiser=optimiser, progress=progress)[0]


def null_text_inversions(
    model: Model,
    grid: DdimGrid,
    x_0: Tensor,
    cond: Condition,
    uncond: Condition,
    config: NullTextConfig | None = None,
    *,
    optimiser: StepFactory = adam_steps,
    progress: bool = False,
) -> list[NullTextInversion]:
    """:func:`null_text_inversion` of B images ``[B, C, h, w]`` in one loop, each as if alone (within rounding).

    ``cond`` holds one caption for all or one per image. The inversions and every
    forward run batched; each image learns its own phi_t (a row of one ``[B, L, D]``
    parameter, :func:`null_text_loss`), and stops its step early on its own: once an
    image's loss is below the tolerance its row is put back after every later update of
    the step, and the step ends when every image has stopped or after K updates.
    """
    config = config or NullTextConfig()
    if grid.num_steps != config.num_steps:
        raise HifiError(f"the DDIM grid has {grid.num_steps} steps but the config asks for {config.num_steps}")
    guidance, batch, device = config.guidance, x_0.shape[0], x_0.device
    if cond.batch not in (1, batch):
        raise HifiError(f"{cond.batch} captions for {batch} images")
    with torch.no_grad():
        trajectory = ddim_invert(model, grid, x_0, cond)
    loss_fn = Bound(null_text_loss, model, grid, guidance)

    phi = uncond.sequence.detach().float().expand(batch, *uncond.sequence.shape[1:]).clone()
    runner = optimiser(loss_fn, phi, config.lr)
    phis: list[Tensor] = []
    losses: list[list[float]] = []
    iterations: list[list[int]] = []
    x = trajectory[-1]
    for i, step in enumerate(tqdm(grid.steps, desc="null-text inversion", disable=not progress, leave=False)):
        on = step.on(device)
        target = trajectory[grid.num_steps - 1 - i].float()
        with torch.no_grad():
            out_cond = () if config.naive else (model(x, on.t, cond),)
        inputs = (x, on.t, on.level, on.level_prev, cond, uncond, target, *out_cond)
        runner.restart(phi)  # a fresh Adam for each step, from phi_{t+1}*
        stopped = torch.zeros(batch, dtype=torch.bool)
        step_loss, step_k = [0.0] * batch, [config.inner_steps] * batch
        x_next = torch.empty_like(x)
        # K updates need K + 1 evaluations: each update returns the losses and x_{t-1} at the
        # value it started from; an image that stops early has that value put back.
        for k in range(config.inner_steps + 1):
            if k == config.inner_steps:
                with torch.no_grad():
                    _, x_prev, per_image = loss_fn(runner.param, *inputs)
            else:
                before = runner.param.detach().clone() if config.tolerance > 0 else None
                _, x_prev, per_image = runner(*inputs)
                if before is None:
                    continue  # no tolerance: nothing to read back before the last evaluation
            values = per_image.tolist()
            for b in range(batch):
                if stopped[b]:
                    continue
                if k == config.inner_steps or (config.tolerance > 0 and values[b] < config.tolerance):
                    stopped[b], step_loss[b], step_k[b] = True, values[b], k
                    x_next[b] = x_prev[b].detach()
            if k < config.inner_steps and before is not None and bool(stopped.any()):
                rows = stopped.to(device)
                with torch.no_grad():
                    runner.param[rows] = before[rows]
            if bool(stopped.all()):
                break
        phi = runner.param.detach().clone()
        phis.append(phi.to(uncond.dtype))
        losses.append(step_loss)
        iterations.append(step_k)
        x = x_next
    return [
        NullTextInversion(
            trajectory=tuple(z[b : b + 1] for z in trajectory),
            phis=tuple(uncond.with_sequence(p[b : b + 1]) for p in phis),
            reconstruction=x[b : b + 1], losses=tuple(step[b] for step in losses),
            iterations=tuple(step[b] for step in iterations), cond=cond if cond.batch == 1 else cond[b],
            guidance=guidance,
        )
        for b in range(batch)
    ]


def null_text_sample(
    model: Model,
    grid: DdimGrid,
    x_T: Tensor,
    cond: Condition | Sequence[Condition],
    phis: Sequence[Condition],
    *,
    guidance: float,
    callback: StepCallback | None = None,
) -> Tensor:
    """Guided DDIM with one null embedding per step: x_{t-1} = F^(t)(x_t, c^t, phi_t*) (Eq. 1).

    ``cond`` is one condition for every step or one per step (``[c^g, c_s^t]``, Eq. 7);
    ``phis`` come from :func:`null_text_inversion` along the same ``grid``.
    The batch may hold several samples (the reconstruction and the edit of Algorithm 3).
    """
    return ddim_sample(model, grid, x_T, cond, uncond=list(phis), guidance=guidance, callback=callback)
