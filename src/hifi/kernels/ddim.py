"""DDIM denoising and inversion (Eq. 1 and Eq. 3), free of any scheduler object.

Every function here is a pure function of tensors and numbers. The noise schedule is a
small immutable value, :class:`Schedule`, built from the cumulative products of alphas or
from any diffusers scheduler config; the DDIM step needs two numbers from it,
``alpha_t = alphas_cumprod[t]`` and ``alpha_prev``, and nothing else, so the same step
serves Stable Diffusion 1.x (epsilon prediction) and 2.x (v prediction) alike.

Notation (Song et al., DDIM; the paper's Eq. 1 and 3 with eta = 0):

    x0_hat  = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    x_prev  = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev) * eps        (Eq. 1, beta_t and gamma_t)
    x_next  = sqrt(a_next) * x0_hat + sqrt(1 - a_next) * eps        (Eq. 3, the same map run
                                                                     towards more noise)

so ``beta_t = sqrt(a_prev / a_t)`` and ``gamma_t = sqrt(a_prev (1 - a_t) / a_t) -
sqrt(1 - a_prev)`` in the paper's notation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import attrs
import torch
from torch import Tensor

from hifi.errors import HifiError

PredictionType = Literal["epsilon", "v_prediction"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]

__all__ = [
    "Alpha",
    "DdimGrid",
    "DdimStep",
    "PredictionType",
    "add_noise",
    "Schedule",
    "cfg_combine",
    "ddim_inverse_step",
    "ddim_step",
    "ddim_timesteps",
    "predict_x0_and_eps",
    "training_target",
]


def _betas(config: Mapping[str, Any]) -> torch.Tensor:
    """Betas exactly as diffusers computes them (float32), so alphas agree to the bit."""
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    if trained is not None:
        return torch.tensor(list(trained), dtype=torch.float32)
    kind = config.get("beta_schedule", "linear")
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unsupported beta_schedule {kind!r} (linear, scaled_linear, squaredcos_cap_v2)")


@attrs.frozen(cache_hash=True)
class Schedule:
    """The noise schedule a DDIM step needs, as an immutable value.

    Attributes:
        alphas_cumprod: ``a_t`` for t = 0 .. num_train_timesteps - 1.
        prediction_type: what the denoiser predicts, ``"epsilon"`` or ``"v_prediction"``.
        final_alpha_cumprod: ``a`` used past the last step (t < 0): 1.0 when the scheduler
            config has ``set_alpha_to_one``, else ``a_0``, as diffusers does.
        steps_offset: added to every timestep of the DDIM grid (Stable Diffusion uses 1).
        timestep_spacing: how the grid of N DDIM steps is laid out.
        clip_sample_range: when set, x0_hat is clipped to +-range in the denoising step
            (diffusers' ``clip_sample``); never applied during inversion.
    """

    alphas_cumprod: tuple[float, ...]
    prediction_type: PredictionType = "epsilon"
    final_alpha_cumprod: float = 1.0
    steps_offset: int = 0
    timestep_spacing: TimestepSpacing = "leading"
    clip_sample_range: float | None = None

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha(self, t: int) -> float:
        """``a_t``; timesteps below zero mean "fully denoised" (``final_alpha_cumprod``)."""
        if t < 0:
            return self.final_alpha_cumprod
        return self.alphas_cumprod[min(t, self.num_train_timesteps - 1)]

    def stride(self, num_steps: int) -> int:
        """Distance in training timesteps between neighbouring DDIM steps."""
        return self.num_train_timesteps // num_steps

    def to_config(self) -> dict[str, Any]:
        """A JSON-friendly summary (for run metadata and compatibility checks)."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": self.prediction_type,
            "final_alpha_cumprod": self.final_alpha_cumprod,
            "steps_offset": self.steps_offset,
            "timestep_spacing": self.timestep_spacing,
            "clip_sample_range": self.clip_sample_range,
            "alphas_cumprod_sum": round(sum(self.alphas_cumprod), 6),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Schedule:
        """Build from any diffusers scheduler config (DDIM, PNDM, DDPM, Euler ... alike).

        Only the fields that define the forward process and the DDIM grid are read, so a
        model shipped with another scheduler still gets the same alphas.
        """
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr schedules are not supported yet")
        if config.get("thresholding"):
            raise ValueError("dynamic thresholding is not supported by the DDIM kernels")
        alphas = torch.cumprod(1.0 - _betas(config), dim=0)
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {prediction!r}")
        spacing = config.get("timestep_spacing", "leading")
        if spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"unsupported timestep_spacing {spacing!r}")
        # DDIM's own default is set_alpha_to_one=True; Stable Diffusion's configs say False.
        final = 1.0 if config.get("set_alpha_to_one", True) else float(alphas[0])
        clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample") else None
        return cls(
            alphas_cumprod=tuple(float(a) for a in alphas),
            prediction_type=prediction,
            final_alpha_cumprod=final,
            steps_offset=int(config.get("steps_offset", 0)),
            timestep_spacing=spacing,
            clip_sample_range=clip,
        )


def ddim_timesteps(schedule: Schedule, num_steps: int) -> tuple[int, ...]:
    """The N-step DDIM grid, largest timestep first (diffusers' ``set_timesteps``)."""
    n_train = schedule.num_train_timesteps
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps must be in 1..{n_train}, got {num_steps}")
    if schedule.timestep_spacing == "leading":
        grid = [i * (n_train // num_steps) + schedule.steps_offset for i in range(num_steps)]
    elif schedule.timestep_spacing == "trailing":
        grid = [int(round(n_train - i * n_train / num_steps)) - 1 for i in range(num_steps)]
    else:
        step = (n_train - 1) / max(num_steps - 1, 1)
        grid = [int(round(i * step)) for i in range(num_steps)]
    return tuple(sorted(grid, reverse=True))


Alpha = float | Tensor
"""``a_t`` as a number, or as a 0-d tensor on the sample's device: a captured CUDA graph or a
compiled step takes the alphas of each timestep as inputs instead of baking them in."""


class DdimStep(NamedTuple):
    """One step of a DDIM grid: timestep ``t`` and the pair ``(a_t, a_prev)`` at t and t - stride.

    Denoising maps x_t to x_{t-stride} with this pair (Eq. 1); inversion runs the same step
    the other way, from x_{t-stride} to x_t (Eq. 3). The fields are numbers, or 0-d tensors
    on a device (:meth:`on`) when a captured graph takes them as inputs. A named tuple, so
    that ``torch.compile`` traces its construction inside a loss.
    """

    t: int | Tensor
    alpha_t: Alpha
    alpha_prev: Alpha

    def on(self, device: torch.device | str) -> DdimStep:
        """The same step as 0-d tensors on ``device`` (int64 timestep, float32 alphas)."""
        alphas = torch.tensor([float(self.alpha_t), float(self.alpha_prev)], dtype=torch.float32, device=device)
        return DdimStep(t=torch.as_tensor(self.t, dtype=torch.int64, device=device), alpha_t=alphas[0],
                        alpha_prev=alphas[1])


@attrs.frozen(cache_hash=True)
class DdimGrid:
    """The N-step DDIM grid of a :class:`Schedule`, built once: k-diffusion's ``sigmas`` for DDIM.

    ``steps[i]`` is the i-th denoising step (0-based, largest timestep first), with its
    timestep and alpha pair; :meth:`inversion` lists them in the order DDIM inversion takes
    them. Every loop of the method (sampling, inversion, null-text inversion, reference
    guidance, Algorithm 1) walks one of these instead of recomputing timesteps and strides.
    """

    schedule: Schedule
    steps: tuple[DdimStep, ...]

    @classmethod
    def build(cls, schedule: Schedule, num_steps: int) -> DdimGrid:
        """The grid of ``num_steps`` steps (diffusers' ``set_timesteps``; a clear error outside 1..N)."""
        if not 1 <= num_steps <= schedule.num_train_timesteps:
            raise HifiError(f"the number of DDIM steps T must be in 1..{schedule.num_train_timesteps}"
                            f" (the model's training timesteps), got {num_steps}")
        stride = schedule.stride(num_steps)
        steps = tuple(DdimStep(t, schedule.alpha(t), schedule.alpha(t - stride))
                      for t in ddim_timesteps(schedule, num_steps))
        return cls(schedule=schedule, steps=steps)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def timesteps(self) -> tuple[int, ...]:
        return tuple(int(s.t) for s in self.steps)

    def inversion(self) -> tuple[DdimStep, ...]:
        """The steps in inversion order (smallest timestep first)."""
        return self.steps[::-1]


def _roots(alpha: Alpha) -> tuple[Alpha, Alpha]:
    """``(sqrt(a), sqrt(1 - a))`` of a number or a tensor, without a host read-back."""
    if isinstance(alpha, Tensor):
        return alpha.sqrt(), (1.0 - alpha).sqrt()
    return math.sqrt(alpha), math.sqrt(1.0 - alpha)


def predict_x0_and_eps(
    model_output: Tensor, sample: Tensor, alpha_t: Alpha, prediction_type: PredictionType
) -> tuple[Tensor, Tensor]:
    """Turn a denoiser output into the predicted clean sample and noise at ``a_t``."""
    sa, sb = _roots(alpha_t)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sb * eps) / sa
    elif prediction_type == "v_prediction":
        x0 = sa * sample - sb * model_output
        eps = sa * model_output + sb * sample
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return x0, eps


def ddim_step(
    model_output: Tensor,
    sample: Tensor,
    alpha_t: Alpha,
    alpha_prev: Alpha,
    prediction_type: PredictionType = "epsilon",
    clip_sample_range: float | None = None,
) -> Tensor:
    """One deterministic DDIM denoising step x_t -> x_{t-1} (Eq. 1, eta = 0).

    ``model_output`` is the (already guided, see :func:`cfg_combine`) denoiser output at
    ``sample``. Equals diffusers' ``DDIMScheduler.step(...).prev_sample`` with eta = 0.
    The alphas may be numbers or 0-d tensors (:data:`Alpha`); the result is the same.
    """
    x0, eps = predict_x0_and_eps(model_output, sample, alpha_t, prediction_type)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    sa, sb = _roots(alpha_prev)
    return sa * x0 + sb * eps


def ddim_inverse_step(
    model_output: Tensor,
    sample: Tensor,
    alpha_t: Alpha,
    alpha_next: Alpha,
    prediction_type: PredictionType = "epsilon",
) -> Tensor:
    """One DDIM inversion step x_t -> x_{t+1} (Eq. 3): the denoising map run backwards.

    Equals diffusers' ``DDIMInverseScheduler.step(...).prev_sample``.
    """
    x0, eps = predict_x0_and_eps(model_output, sample, alpha_t, prediction_type)
    sa, sb = _roots(alpha_next)
    return sa * x0 + sb * eps


def cfg_combine(cond: Tensor, uncond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance in the paper's convention: ``w*eps(x,c) + (1-w)*eps(x,phi)``.

    With ``w = 1`` this is the conditional prediction alone; diffusers' ``guidance_scale``
    is the same ``w``.
    """
    return w * cond + (1.0 - w) * uncond



def add_noise(x0: Tensor, eps: Tensor, alpha: Tensor | float) -> Tensor:
    """The forward process N_s(x_0, eps, t) of Algorithm 1: ``sqrt(a_t) x_0 + sqrt(1-a_t) eps``.

    ``alpha`` is ``a_t``: a number, or a ``[B]`` tensor with one value per sample.
    """
    a = torch.as_tensor(alpha, dtype=x0.dtype, device=x0.device)
    if a.dim() == 1:
        a = a.view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def training_target(x0: Tensor, eps: Tensor, alpha: Tensor | float, prediction_type: PredictionType) -> Tensor:
    """What the denoiser should output for ``add_noise(x0, eps, alpha)``: eps, or v."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type != "v_prediction":
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    a = torch.as_tensor(alpha, dtype=x0.dtype, device=x0.device)
    if a.dim() == 1:
        a = a.view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * eps - (1 - a).sqrt() * x0
