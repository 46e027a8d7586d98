"""DDIM denoising and inversion (Eq. 1 and Eq. 3), free of any scheduler object.

Every function here is a pure function of tensors and numbers. The noise schedule is a
small immutable value, :class:`Schedule`, built from any diffusers scheduler config. A
noise level is a pair :class:`Level` ``(alpha_t, sigma_t)``, ``x_t = alpha_t x_0 + sigma_t eps``,
and the DDIM step needs two of them and nothing else, so one step and one inverse step
serve both families of models:

- variance preserving (Stable Diffusion 1.x, 2.x, XL; DDPM's cumulative alphas ``a_t``):
  ``alpha_t = sqrt(a_t)``, ``sigma_t = sqrt(1 - a_t)``; the denoiser predicts eps or v;
- rectified flow (Stable Diffusion 3): ``alpha_t = 1 - sigma_t``, with the sigmas of the
  flow-matching scheduler (shifted); the denoiser predicts the velocity
  ``v = eps - x_0`` (``prediction_type = "flow"``).

Notation (Song et al., DDIM; the paper's Eq. 1 and 3 with eta = 0):

    x0_hat, eps_hat = the denoiser output read at level (alpha_t, sigma_t)
    x_prev  = alpha_prev * x0_hat + sigma_prev * eps_hat            (Eq. 1)
    x_next  = alpha_next * x0_hat + sigma_next * eps_hat            (Eq. 3, the same map run
                                                                     towards more noise)

For epsilon prediction this is ``beta_t = alpha_prev / alpha_t`` and ``gamma_t =
alpha_prev sigma_t / alpha_t - sigma_prev`` in the paper's notation. For a rectified flow
it is exactly the Euler step ``x_prev = x_t + (sigma_prev - sigma_t) v`` (diffusers'
``FlowMatchEulerDiscreteScheduler.step``), and inversion runs the same map towards noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import attrs
import torch
from torch import Tensor

from hifi.errors import HifiError

PredictionType = Literal["epsilon", "v_prediction", "flow"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
Timestep = int | float
"""A denoiser's timestep: an integer training step (DDPM schedules), or ``sigma * N`` (flows)."""

__all__ = [
    "Alpha",
    "DdimGrid",
    "DdimStep",
    "Level",
    "PredictionType",
    "add_noise",
    "Schedule",
    "cfg_combine",
    "ddim_inverse_step",
    "ddim_step",
    "ddim_timesteps",
    "flow_sigmas",
    "predict_x0_and_eps",
    "timestep_from_text",
    "timestep_number",
    "timestep_text",
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


Alpha = float | Tensor
"""One number of a noise level: a Python float, or a 0-d tensor on the sample's device (a
captured CUDA graph or a compiled step takes the levels of each timestep as inputs)."""


class Level(NamedTuple):
    """A noise level ``(alpha, sigma)``: ``x_t = alpha x_0 + sigma eps`` (a named tuple: graphs and compile take it)."""

    alpha: Alpha
    sigma: Alpha


@attrs.frozen(cache_hash=True)
class Schedule:
    """The noise schedule a DDIM step needs, as an immutable value.

    Attributes:
        alphas_cumprod: ``a_t`` for t = 0 .. num_train_timesteps - 1 (variance-preserving
            schedules; empty for a flow).
        prediction_type: what the denoiser predicts: ``"epsilon"``, ``"v_prediction"`` or
            ``"flow"`` (the velocity of a rectified flow).
        final_alpha_cumprod: ``a`` used past the last step (t < 0): 1.0 when the scheduler
            config has ``set_alpha_to_one``, else ``a_0``, as diffusers does.
        steps_offset: added to every timestep of the DDIM grid (Stable Diffusion uses 1).
        timestep_spacing: how the grid of N DDIM steps is laid out.
        clip_sample_range: when set, x0_hat is clipped to +-range in the denoising step
            (diffusers' ``clip_sample``); never applied during inversion.
        flow_steps: a flow's number of training timesteps N (0 for variance-preserving schedules).
        shift: a flow's sigma shift, ``sigma' = shift sigma / (1 + (shift - 1) sigma)`` (SD3: 3.0).
    """

    alphas_cumprod: tuple[float, ...]
    prediction_type: PredictionType = "epsilon"
    final_alpha_cumprod: float = 1.0
    steps_offset: int = 0
    timestep_spacing: TimestepSpacing = "leading"
    clip_sample_range: float | None = None
    flow_steps: int = 0
    shift: float = 1.0

    @property
    def is_flow(self) -> bool:
        """A rectified flow (``alpha = 1 - sigma``, velocity prediction) rather than a DDPM schedule."""
        return self.prediction_type == "flow"

    @property
    def num_train_timesteps(self) -> int:
        return self.flow_steps if self.is_flow else len(self.alphas_cumprod)

    def alpha(self, t: int) -> float:
        """``a_t`` of a DDPM schedule; timesteps below zero mean "fully denoised" (``final_alpha_cumprod``)."""
        if self.is_flow:
            raise ValueError("a flow schedule has no cumulative alphas; use level(t)")
        if t < 0:
            return self.final_alpha_cumprod
        return self.alphas_cumprod[min(t, self.num_train_timesteps - 1)]

    def level(self, t: Timestep) -> Level:
        """The noise level ``(alpha_t, sigma_t)`` at timestep t (a flow's t is ``sigma * N``; t <= 0 is clean)."""
        if self.is_flow:
            sigma = max(float(t), 0.0) / self.flow_steps
            return Level(1.0 - sigma, sigma)
        a = self.alpha(int(t))
        return Level(math.sqrt(a), math.sqrt(1.0 - a))

    def shifted(self, sigmas: Tensor) -> Tensor:
        """A flow's shift of its sigmas (:attr:`shift`)."""
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def training_timesteps(self) -> Tensor:
        """The N timesteps the model was trained on, as it reads them: ``0..N-1`` (int64), or a flow's
        shifted ``sigma * N`` (float32, largest first, as its scheduler lists them)."""
        if not self.is_flow:
            return torch.arange(self.num_train_timesteps, dtype=torch.int64)
        return self.training_sigmas() * self.flow_steps

    def training_sigmas(self) -> Tensor:
        """A flow's shifted training sigmas, largest first, in float32 as its scheduler computes them."""
        n = self.flow_steps
        return self.shifted(torch.linspace(1, n, n, dtype=torch.float32).flip(0) / n)

    def levels(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` for a ``[B]`` tensor of timesteps (float64, on the timesteps' device)."""
        if self.is_flow:
            sigma = timesteps.to(torch.float64).clamp(min=0) / self.flow_steps
            return 1.0 - sigma, sigma
        a = torch.tensor(self.alphas_cumprod, dtype=torch.float64, device=timesteps.device)[timesteps.long()]
        return a.sqrt(), (1.0 - a).sqrt()

    def stride(self, num_steps: int) -> int:
        """Distance in training timesteps between neighbouring DDIM steps."""
        return self.num_train_timesteps // num_steps

    def to_config(self) -> dict[str, Any]:
        """A JSON-friendly summary (for run metadata and compatibility checks)."""
        config: dict[str, Any] = {
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": self.prediction_type,
            "final_alpha_cumprod": self.final_alpha_cumprod,
            "steps_offset": self.steps_offset,
            "timestep_spacing": self.timestep_spacing,
            "clip_sample_range": self.clip_sample_range,
            "alphas_cumprod_sum": round(sum(self.alphas_cumprod), 6),
        }
        if self.is_flow:
            config["shift"] = self.shift
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Schedule:
        """Build from any diffusers scheduler config (DDIM, PNDM, DDPM, Euler ... alike; a
        ``FlowMatchEulerDiscreteScheduler`` config gives a flow).

        Only the fields that define the forward process and the DDIM grid are read, so a
        model shipped with another scheduler still gets the same alphas.
        """
        if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler" or "shift" in config:
            return cls._flow(config)
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

    @classmethod
    def _flow(cls, config: Mapping[str, Any]) -> Schedule:
        for key in ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                    "use_beta_sigmas", "invert_sigmas"):
            if config.get(key):
                raise ValueError(f"flow schedules with {key} are not supported yet")
        return cls(alphas_cumprod=(), prediction_type="flow", final_alpha_cumprod=1.0,
                   flow_steps=int(config.get("num_train_timesteps", 1000)), shift=float(config.get("shift", 1.0)),
                   timestep_spacing="linspace")


def ddim_timesteps(schedule: Schedule, num_steps: int) -> tuple[Timestep, ...]:
    """The N-step DDIM grid, largest timestep first (diffusers' ``set_timesteps``).

    For a flow, ``FlowMatchEulerDiscreteScheduler.set_timesteps``: N points from
    ``sigma_max`` to ``sigma_min`` (of the shifted training sigmas), shifted, times N_train.
    """
    n_train = schedule.num_train_timesteps
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps must be in 1..{n_train}, got {num_steps}")
    if schedule.is_flow:
        return tuple(float(t) for t in torch.tensor(flow_sigmas(schedule, num_steps)) * n_train)
    if schedule.timestep_spacing == "leading":
        grid = [i * (n_train // num_steps) + schedule.steps_offset for i in range(num_steps)]
    elif schedule.timestep_spacing == "trailing":
        grid = [int(round(n_train - i * n_train / num_steps)) - 1 for i in range(num_steps)]
    else:
        step = (n_train - 1) / max(num_steps - 1, 1)
        grid = [int(round(i * step)) for i in range(num_steps)]
    return tuple(sorted(grid, reverse=True))


def flow_sigmas(schedule: Schedule, num_steps: int) -> tuple[float, ...]:
    """A flow's N sigmas of the DDIM grid, largest first (float32 values, as its scheduler computes them)."""
    trained = schedule.training_sigmas()
    n = schedule.flow_steps
    points = torch.linspace(float(trained[0]) * n, float(trained[-1]) * n, num_steps, dtype=torch.float64)
    return tuple(float(s) for s in schedule.shifted(points / n).to(torch.float32))


def timestep_number(t: Timestep | Tensor) -> Timestep:
    """A step's timestep as a Python number (a grid holds numbers; :meth:`DdimStep.on` makes tensors)."""
    return t.item() if isinstance(t, Tensor) else t


def timestep_text(t: Timestep) -> str:
    """A timestep as a file key: ``0981`` for an integer, the shortest exact decimal for a flow's float."""
    return f"{t:04d}" if isinstance(t, int) else repr(float(t))


def timestep_from_text(text: str) -> Timestep:
    """The timestep :func:`timestep_text` wrote."""
    return float(text) if any(c in text for c in ".en") else int(text)


class DdimStep(NamedTuple):
    """One step of a DDIM grid: timestep ``t``, its noise level and the level the step goes to.

    Denoising maps x_t at ``level`` to x_prev at ``level_prev`` (Eq. 1): on a DDPM schedule
    the level of ``t - stride``, on a flow the grid's next sigma (0 after the last step);
    inversion runs the same step the other way (Eq. 3). The fields are numbers, or tensors
    on a device (:meth:`on`) when a captured graph takes them as inputs. A named tuple, so
    that ``torch.compile`` traces its construction inside a loss.
    """

    t: Timestep | Tensor
    level: Level
    level_prev: Level

    def on(self, device: torch.device | str) -> DdimStep:
        """The same step as 0-d tensors on ``device`` (an int64 or float32 timestep, float32 levels)."""
        values = torch.tensor([*map(float, self.level), *map(float, self.level_prev)], dtype=torch.float32,
                              device=device)
        dtype = torch.float32 if isinstance(self.t, float) else torch.int64
        return DdimStep(t=torch.as_tensor(self.t, dtype=dtype, device=device), level=Level(values[0], values[1]),
                        level_prev=Level(values[2], values[3]))


@attrs.frozen(cache_hash=True)
class DdimGrid:
    """The N-step DDIM grid of a :class:`Schedule`, built once: k-diffusion's ``sigmas`` for DDIM.

    ``steps[i]`` is the i-th denoising step (0-based, largest timestep first), with its
    timestep and level pair; :meth:`inversion` lists them in the order DDIM inversion takes
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
        timesteps = ddim_timesteps(schedule, num_steps)
        if schedule.is_flow:  # the levels from the sigmas themselves, as the Euler scheduler steps
            sigmas = (*flow_sigmas(schedule, num_steps), 0.0)
            levels = [Level(1.0 - s, s) for s in sigmas]
            steps = tuple(DdimStep(t, levels[i], levels[i + 1]) for i, t in enumerate(timesteps))
        else:
            stride = schedule.stride(num_steps)
            steps = tuple(DdimStep(t, schedule.level(t), schedule.level(int(t) - stride)) for t in timesteps)
        return cls(schedule=schedule, steps=steps)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def timesteps(self) -> tuple[Timestep, ...]:
        """The steps' timesteps (ints, or a flow's floats), largest first: the keys of step-wise c_s^t."""
        return tuple(timestep_number(s.t) for s in self.steps)

    def inversion(self) -> tuple[DdimStep, ...]:
        """The steps in inversion order (smallest timestep first)."""
        return self.steps[::-1]


def predict_x0_and_eps(
    model_output: Tensor, sample: Tensor, level: Level, prediction_type: PredictionType
) -> tuple[Tensor, Tensor]:
    """Turn a denoiser output at ``level`` = (alpha_t, sigma_t) into the predicted clean sample and noise."""
    alpha, sigma = level
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sigma * eps) / alpha
    elif prediction_type == "v_prediction":  # v = alpha eps - sigma x0, with alpha^2 + sigma^2 = 1
        x0 = alpha * sample - sigma * model_output
        eps = alpha * model_output + sigma * sample
    elif prediction_type == "flow":  # v = eps - x0, with alpha + sigma = 1
        x0 = sample - sigma * model_output
        eps = sample + alpha * model_output
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return x0, eps


def ddim_step(
    model_output: Tensor,
    sample: Tensor,
    level: Level,
    level_prev: Level,
    prediction_type: PredictionType = "epsilon",
    clip_sample_range: float | None = None,
) -> Tensor:
    """One deterministic DDIM denoising step x_t -> x_prev (Eq. 1, eta = 0).

    ``model_output`` is the (already guided, see :func:`cfg_combine`) denoiser output at
    ``sample``. Equals diffusers' ``DDIMScheduler.step(...).prev_sample`` with eta = 0, and
    for a flow ``FlowMatchEulerDiscreteScheduler.step`` (the Euler step). The levels may
    hold numbers or 0-d tensors (:data:`Alpha`); the result is the same.
    """
    if prediction_type == "flow":  # x0_hat and eps_hat re-noised: exactly the Euler step, written as it
        return sample + (level_prev.sigma - level.sigma) * model_output
    x0, eps = predict_x0_and_eps(model_output, sample, level, prediction_type)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    return level_prev.alpha * x0 + level_prev.sigma * eps


def ddim_inverse_step(
    model_output: Tensor,
    sample: Tensor,
    level: Level,
    level_next: Level,
    prediction_type: PredictionType = "epsilon",
) -> Tensor:
    """One DDIM inversion step x_t -> x_next (Eq. 3): the denoising map run backwards.

    Equals diffusers' ``DDIMInverseScheduler.step(...).prev_sample``; for a flow, the Euler
    step towards noise, ``x + (sigma_next - sigma_t) v``.
    """
    if prediction_type == "flow":
        return sample + (level_next.sigma - level.sigma) * model_output
    x0, eps = predict_x0_and_eps(model_output, sample, level, prediction_type)
    return level_next.alpha * x0 + level_next.sigma * eps


def cfg_combine(cond: Tensor, uncond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance in the paper's convention: ``w*eps(x,c) + (1-w)*eps(x,phi)``.

    With ``w = 1`` this is the conditional prediction alone; diffusers' ``guidance_scale``
    is the same ``w``.
    """
    return w * cond + (1.0 - w) * uncond


def _per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return v.view(-1, *([1] * (like.dim() - 1))) if v.dim() == 1 else v


def add_noise(x0: Tensor, eps: Tensor, level: Level | tuple[Tensor, Tensor]) -> Tensor:
    """The forward process N_s(x_0, eps, t) of Algorithm 1: ``alpha_t x_0 + sigma_t eps``.

    ``level`` is ``(alpha_t, sigma_t)``: numbers, or ``[B]`` tensors with one value per sample
    (:meth:`Schedule.levels`).
    """
    alpha, sigma = level
    return _per_sample(alpha, x0) * x0 + _per_sample(sigma, x0) * eps


def training_target(x0: Tensor, eps: Tensor, level: Level | tuple[Tensor, Tensor],
                    prediction_type: PredictionType) -> Tensor:
    """What the denoiser should output for ``add_noise(x0, eps, level)``: eps, v, or a flow's velocity."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "flow":
        return eps - x0
    if prediction_type != "v_prediction":
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    alpha, sigma = level
    return _per_sample(alpha, x0) * eps - _per_sample(sigma, x0) * x0
