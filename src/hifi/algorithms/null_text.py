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

from collections.abc import Callable, Sequence

import attrs
import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from hifi.algorithms.sampling import Model, StepCallback, ddim_invert, ddim_sample, null_guided_step
from hifi.errors import HifiError
from hifi.execution.fastpath import AdamStep, accelerate_model, timestep_tensor
from hifi.kernels.ddim import Schedule, ddim_timesteps

__all__ = ["NullTextConfig", "NullTextInversion", "null_text_inversion", "null_text_sample"]


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
        phis: phi_t* for each DDIM step in denoising order (t = T..1), each ``[1, L, D]``.
        reconstruction: x_0 of the guided denoising with ``phis`` from x*_T.
        losses: Eq. 4 at each step's last evaluation (after its updates).
        iterations: Adam updates taken at each step (K, or fewer after early stopping).
        cond: the caption embedding c ``[1, L, D]``.
        guidance: the guidance weight w the phis were learned for.
    """

    trajectory: tuple[Tensor, ...]
    phis: tuple[Tensor, ...]
    reconstruction: Tensor
    losses: tuple[float, ...]
    iterations: tuple[int, ...]
    cond: Tensor
    guidance: float

    @property
    def num_steps(self) -> int:
        return len(self.phis)

    @property
    def x_T(self) -> Tensor:
        return self.trajectory[-1]


def null_text_inversion(
    model: Model,
    schedule: Schedule,
    x_0: Tensor,
    cond: Tensor,
    uncond: Tensor,
    config: NullTextConfig | None = None,
    *,
    progress: bool = False,
    accel: str = "eager",
) -> NullTextInversion:
    """Invert ``x_0`` ``[1, C, h, w]`` under caption ``cond`` and learn one phi_t per step (Eq. 4).

    ``uncond`` is phi ``[1, L, D]``, the start of phi_T. Each step takes at most K
    (``config.inner_steps``) Adam updates and stops early once the loss is below
    ``config.tolerance``. phi is optimised in float32 whatever the model's dtype.
    ``accel`` (:mod:`hifi.execution.fastpath`) runs the inversion's forwards and the phi_t steps
    eagerly, compiled, or as CUDA graphs; the numbers are the eager ones within tolerance.
    """
    config = config or NullTextConfig()
    num_steps, guidance = config.num_steps, config.guidance
    timesteps = ddim_timesteps(schedule, num_steps)
    stride = schedule.stride(num_steps)
    device = x_0.device
    fast = accelerate_model(model, device, accel)
    with torch.no_grad():
        trajectory = ddim_invert(fast, schedule, x_0, cond, num_steps=num_steps)

    def loss_of(net: Model) -> Callable[..., tuple[Tensor, Tensor]]:
        def f_h(phi: Tensor, x: Tensor, t: Tensor, a_t: Tensor, a_prev: Tensor, target: Tensor,
                *out_cond: Tensor) -> tuple[Tensor, Tensor]:
            """Eq. 4 and x_{t-1} as a function of tensors only (the step AdamStep runs)."""
            x_prev = null_guided_step(net, schedule, x, t, a_t, a_prev, cond, phi, guidance, *out_cond)
            return F.mse_loss(x_prev.float(), target), x_prev

        return f_h

    f_h, f_h_forward = loss_of(model), loss_of(fast)  # the step; the no-gradient evaluation

    phi = uncond.detach().float()
    param = phi.clone().requires_grad_(True)
    runner = AdamStep(f_h, param, config.lr, accel)
    phis: list[Tensor] = []
    losses: list[float] = []
    iterations: list[int] = []
    x = trajectory[-1]
    for i, t in enumerate(tqdm(timesteps, desc="null-text inversion", disable=not progress, leave=False)):
        alphas = torch.tensor([schedule.alpha(t), schedule.alpha(t - stride)], dtype=torch.float32, device=device)
        target = trajectory[num_steps - 1 - i].float()
        t_dev = timestep_tensor(t, device)
        with torch.no_grad():
            out_cond = () if config.naive else (fast(x, t, cond),)
        inputs = (x, t_dev, alphas[0], alphas[1], target, *out_cond)
        runner.restart(phi)  # a fresh Adam for each step, from phi_{t+1}*
        # K updates need K + 1 evaluations: each update returns the loss and x_{t-1} at the
        # value it started from; a step that stops early puts that value back.
        for k in range(config.inner_steps + 1):
            if k == config.inner_steps:
                with torch.no_grad():
                    loss, x_prev = f_h_forward(runner.param, *inputs)
                break
            before = runner.param.detach().clone() if config.tolerance > 0 else None
            loss, x_prev = runner(*inputs)
            if before is not None and loss.item() < config.tolerance:
                with torch.no_grad():
                    runner.param.copy_(before)
                break
        phi = runner.param.detach().clone()
        phis.append(phi.to(uncond.dtype))
        losses.append(loss.item())
        iterations.append(k)
        x = x_prev.detach()
    return NullTextInversion(
        trajectory=tuple(trajectory), phis=tuple(phis), reconstruction=x, losses=tuple(losses),
        iterations=tuple(iterations), cond=cond, guidance=guidance,
    )


def null_text_sample(
    model: Model,
    schedule: Schedule,
    x_T: Tensor,
    cond: Tensor | Sequence[Tensor],
    phis: Sequence[Tensor],
    *,
    guidance: float,
    callback: StepCallback | None = None,
) -> Tensor:
    """Guided DDIM with one null embedding per step: x_{t-1} = F^(t)(x_t, c^t, phi_t*) (Eq. 1).

    ``cond`` is one embedding for every step or one per step (``[c^g, c_s^t]``, Eq. 7);
    ``phis`` come from :func:`null_text_inversion`, and the number of steps is theirs.
    The batch may hold several samples (the reconstruction and the edit of Algorithm 3).
    """
    return ddim_sample(
        model, schedule, x_T, cond, uncond=list(phis), guidance=guidance, num_steps=len(phis), callback=callback
    )
