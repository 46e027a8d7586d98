"""The state every tuning loop shares (Section 3.2): settings, data, generator, log, checkpoints.

Every loop draws its timesteps and noise from one seeded generator, and can hand its
whole state to a :class:`Checkpointer` at any step boundary, so that an interrupted tune
resumes and ends exactly where an uninterrupted one would. The loops themselves are in
:mod:`hifi.algorithms.tune_hifi` (Eq. 6, Algorithm 1) and :mod:`hifi.algorithms.tune_baselines`
(classic Textual Inversion, DreamBooth); :func:`hifi.algorithms.tune.tune` runs one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
import torch
from torch import Tensor

from hifi.algorithms.subject import IDENTIFIER, PLACEHOLDER, Mode
from hifi.errors import HifiError
from hifi.kernels.ddim import Timestep, add_noise, training_target
from hifi.kernels.losses import noise_loss
from hifi.protocols.denoiser import DenoiserBackend, Model

__all__ = ["Checkpointer", "StepHook", "TuneConfig", "TuneLoop", "adam_state", "caption_for", "check_loss"]

DEFAULT_LR: dict[str, float] = {"hifi": 5e-3, "classic-ti": 5e-3, "dreambooth": 5e-6}
DEFAULT_STEPS: dict[str, int] = {"hifi": 1000, "classic-ti": 1000, "dreambooth": 400}
DEFAULT_LORA_LR = 1e-4
"""DreamBooth with LoRA adapters (``lora_rank``): the rate of diffusers' train_dreambooth_lora example."""


@attrs.frozen
class TuneConfig:
    """Every setting of a tune; the defaults are the paper's (Section 4, "Settings").

    ``reg_weight`` (w_s of Eq. 6) has no value in the paper; 1e-4 on the summed squared
    distance is our choice. ``reg_weight = 0`` switches the regulariser off, and then c_s
    starts from the caption's own last n positions instead of phi_s (the "+ regularization"
    row of Table 2 adds both the phi_s start and the term). ``use_mask=False`` is the
    no-mask row; ``stepwise_steps = 0`` the no-step-wise row; ``mode="classic-ti"`` the
    Textual Inversion baseline; ``mode="dreambooth"`` the DreamBooth variant (with ``lora_rank``,
    its LoRA form: low-rank adapters on the denoiser's attention). How fast the
    steps run is not a setting of the tune: it comes with the model and optimiser
    (:mod:`hifi.execution.edge`), changes speed, not the random stream, and a run may resume
    under another execution mode.
    """

    mode: Mode = "hifi"
    steps: int | None = None
    lr: float | None = None
    num_tokens: int = 5
    reg_weight: float = 1e-4
    use_mask: bool = True
    stepwise_steps: int = 10
    num_steps: int = 50
    seed: int = 0
    checkpoint_every: int = 100
    prior_preservation: bool = False
    prior_weight: float = 1.0
    num_class_images: int = 4
    gradient_checkpointing: bool = False
    """Recompute the denoiser's activations in the backward pass (less memory, same result, more time): for
    DreamBooth's weights and, in the other modes, for the gradient that reaches c_s or the token vector."""
    lora_rank: int | None = None
    """DreamBooth only: train LoRA adapters of this rank on the denoiser's attention instead of all its
    weights (None: the full fine-tune)."""

    def __attrs_post_init__(self) -> None:
        checks = [
            (self.mode in DEFAULT_LR, f"unknown mode {self.mode!r}"),
            (self.total_steps >= 0, "--steps must be >= 0"),
            *((math.isfinite(value), f"{flag} must be a finite number, got {value}") for flag, value in
              (("--lr", self.learning_rate), ("--reg-weight", self.reg_weight), ("prior_weight", self.prior_weight))),
            (self.learning_rate > 0, "--lr must be > 0"),
            (self.num_tokens >= 1, "--tokens must be >= 1"),
            (self.reg_weight >= 0, "--reg-weight must be >= 0"),
            (self.prior_weight >= 0, "the prior weight must be >= 0"),
            (self.stepwise_steps >= 0, "--stepwise-steps must be >= 0"),
            (self.num_steps >= 1, "the DDIM step count must be >= 1"),
            (self.checkpoint_every >= 1, "checkpoint interval must be >= 1"),
            (self.num_class_images >= 1, "--class-images must be >= 1"),
            (self.lora_rank is None or self.lora_rank >= 1, "--lora-rank must be >= 1"),
            (self.lora_rank is None or self.mode == "dreambooth",
             "--lora-rank applies to --mode dreambooth, which trains the denoiser"),
        ]
        for ok, message in checks:
            if not ok:
                raise HifiError(message)

    @property
    def total_steps(self) -> int:
        return DEFAULT_STEPS[self.mode] if self.steps is None else self.steps

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR[self.mode] if self.lora_rank is None else DEFAULT_LORA_LR

    def resolved(self) -> dict[str, Any]:
        """The config with defaults filled in, for run.json."""
        return {**attrs.asdict(self), "steps": self.total_steps, "lr": self.learning_rate}


class Checkpointer(Protocol):
    """Where a tune keeps its resumable state (see :class:`hifi.io.runs.FolderCheckpointer`)."""

    def load(self) -> dict[str, Any] | None:
        """The last saved state, or None to start afresh."""
        ...

    def save(self, state: Mapping[str, Any]) -> None:
        """Keep ``state`` (tensors, numbers, strings, nested dicts) atomically."""
        ...


StepHook = Callable[[str, int, float], None]
"""``hook(stage, step, loss)`` after every optimisation step (progress bars, tests)."""


def caption_for(mode: Mode, class_name: str) -> str:
    """The training caption: "a photo of a dog", with the placeholder or identifier per mode."""
    if mode == "classic-ti":
        return f"a photo of a {PLACEHOLDER}"
    if mode == "dreambooth":
        return f"a {IDENTIFIER} {class_name}"
    return f"a photo of a {class_name}"


def check_loss(loss: Tensor | float, stage: str, step: int) -> float:
    value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
    if not math.isfinite(value):
        raise HifiError(
            f"the loss became {value} at {stage} step {step}; the last good checkpoint is kept"
            " (try a lower --lr)"
        )
    return value


class TuneLoop:
    """State shared by the loops of one tune: data, model, generator, log, checkpointing.

    ``masks`` is the latent-grid M of Eq. 5, or None when the tune runs without a mask.
    """

    def __init__(
        self,
        backend: DenoiserBackend,
        model: Model,
        latents: Tensor,
        masks: Tensor | None,
        config: TuneConfig,
        checkpointer: Checkpointer | None,
        on_step: StepHook | None,
    ) -> None:
        self.backend, self.model, self.x0, self.masks, self.config = backend, model, latents, masks, config
        self.checkpointer, self.on_step = checkpointer, on_step
        self.generator = torch.Generator().manual_seed(config.seed)
        self.timesteps = backend.schedule.training_timesteps()
        """The timesteps the model was trained on (ints, or a flow's ``sigma * N``), drawn from uniformly."""
        self.losses: list[dict[str, Any]] = []

    def noisy_batch(self, t: Timestep | None = None, x0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x_t = N_s(x_0, eps, t) for every source image (or ``x0``); t random per image unless given."""
        x0 = self.x0 if x0 is None else x0
        b = x0.shape[0]
        schedule = self.backend.schedule
        ts = (
            self.timesteps[torch.randint(0, len(self.timesteps), (b,), generator=self.generator)]
            if t is None else torch.full((b,), t, dtype=self.timesteps.dtype)
        )
        eps = self._to_device(torch.randn(x0.shape, generator=self.generator), x0)
        alpha, sigma = (self._to_device(v, x0) for v in schedule.levels(ts))
        x_t = add_noise(x0, eps, (alpha, sigma))
        target = training_target(x0, eps, (alpha, sigma), schedule.prediction_type)
        return x_t, self._to_device(ts, x0, dtype=ts.dtype), target

    @staticmethod
    def _to_device(value: Tensor, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``value`` (drawn on the CPU) on ``like``'s device; to a GPU through pinned memory.

        A copy from pageable memory waits for the GPU's queue to drain; one from pinned
        memory does not, so the next step's noise is drawn while this one runs.
        """
        dtype = like.dtype if dtype is None else dtype
        if like.device.type == "cuda":
            return value.pin_memory().to(like.device, dtype, non_blocking=True)
        return value.to(like.device, dtype)

    def noise_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Eq. 5 with the mask on, plain Eq. 2 without (:func:`~hifi.kernels.losses.noise_loss`)."""
        return noise_loss(pred, target, self.masks)

    def log(self, stage: str, step: int, loss: float, **extra: Any) -> None:
        self.losses.append({"stage": stage, "step": step, "loss": loss, **extra})
        if self.on_step is not None:
            self.on_step(stage, step, loss)

    def save(self, state: dict[str, Any]) -> None:
        if self.checkpointer is not None:
            state["config"] = self.config.resolved()
            state["generator"] = self.generator.get_state()
            state["losses"] = list(self.losses)
            self.checkpointer.save(state)

    def restore(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.losses = list(state["losses"])


def adam_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of an optimiser's state, for a checkpoint."""
    return copy.deepcopy(opt.state_dict())
