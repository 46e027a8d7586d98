"""Learning the subject (Section 3.2): c_s with Eq. 5 and 6, step-wise c_s^t (Algorithm 1),
classic Textual Inversion (Eq. 2), and the DreamBooth variant.

Each mode is one plain loop. Every loop draws its timesteps and noise from one seeded
generator, and can hand its whole state to a :class:`Checkpointer` at any step boundary,
so that an interrupted tune resumes and ends exactly where an uninterrupted one would.

Costs kept out of the loops: the caption is encoded once (the text encoder never runs
inside the HiFi and DreamBooth loops; it must for classic TI, which learns an *input*
embedding); the UNet is frozen in the embedding modes; all source images go in one batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from hifi.algorithms.generate import generate
from hifi.algorithms.subject import IDENTIFIER, PLACEHOLDER, Mode, Subject
from hifi.errors import HifiError
from hifi.execution.fastpath import ACCEL_MODES, AdamStep
from hifi.kernels.ddim import add_noise, ddim_timesteps, training_target
from hifi.kernels.losses import masked_mse, resize_mask, ridge_to_null, splice_subject, subject_slots
from hifi.protocols.denoiser import DenoiserBackend

__all__ = ["Checkpointer", "TuneConfig", "TuneResult", "caption_for", "tune"]

DEFAULT_LR: dict[str, float] = {"hifi": 5e-3, "classic-ti": 5e-3, "dreambooth": 5e-6}
DEFAULT_STEPS: dict[str, int] = {"hifi": 1000, "classic-ti": 1000, "dreambooth": 400}


@attrs.frozen
class TuneConfig:
    """Every setting of a tune; the defaults are the paper's (Section 4, "Settings").

    ``reg_weight`` (w_s of Eq. 6) has no value in the paper; 1e-4 on the summed squared
    distance is our choice. ``reg_weight = 0`` switches the regulariser off, and then c_s
    starts from the caption's own last n positions instead of phi_s (the "+ regularization"
    row of Table 2 adds both the phi_s start and the term). ``use_mask=False`` is the
    no-mask row; ``stepwise_steps = 0`` the no-step-wise row; ``mode="classic-ti"`` the
    Textual Inversion baseline; ``mode="dreambooth"`` the DreamBooth variant.
    ``accel`` runs the c_s steps (Eq. 6, Algorithm 1) eagerly, compiled, or as a captured
    CUDA graph (:mod:`hifi.execution.fastpath`); it changes speed, not the random stream, and a run
    may resume under another mode.
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
    accel: str = "eager"

    def __attrs_post_init__(self) -> None:
        checks = [
            (self.mode in DEFAULT_LR, f"unknown mode {self.mode!r}"),
            (self.total_steps >= 0, "--steps must be >= 0"),
            (self.learning_rate > 0, "--lr must be > 0"),
            (self.num_tokens >= 1, "--tokens must be >= 1"),
            (self.reg_weight >= 0, "--reg-weight must be >= 0"),
            (self.stepwise_steps >= 0, "--stepwise-steps must be >= 0"),
            (self.num_steps >= 1, "the DDIM step count must be >= 1"),
            (self.checkpoint_every >= 1, "checkpoint interval must be >= 1"),
            (self.num_class_images >= 1, "--class-images must be >= 1"),
            (self.accel in ACCEL_MODES, f"--accel must be one of {', '.join(ACCEL_MODES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise HifiError(message)

    @property
    def total_steps(self) -> int:
        return DEFAULT_STEPS[self.mode] if self.steps is None else self.steps

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.mode] if self.lr is None else self.lr

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


@attrs.frozen(eq=False)
class TuneResult:
    """The learned subject, the loss log, and (dreambooth) the fine-tuned denoiser weights."""

    subject: Subject
    losses: list[dict[str, Any]]
    caption: str
    denoiser_state: dict[str, Tensor] | None = None


def _same_run(resolved: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The settings that must match to resume (how fast the steps run is not one of them)."""
    return None if resolved is None else {k: v for k, v in resolved.items() if k != "accel"}


def caption_for(mode: Mode, class_name: str) -> str:
    """The training caption: "a photo of a dog", with the placeholder or identifier per mode."""
    if mode == "classic-ti":
        return f"a photo of a {PLACEHOLDER}"
    if mode == "dreambooth":
        return f"a {IDENTIFIER} {class_name}"
    return f"a photo of a {class_name}"


def _check_loss(loss: Tensor | float, stage: str, step: int) -> float:
    value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
    if not math.isfinite(value):
        raise HifiError(
            f"the loss became {value} at {stage} step {step}; the last good checkpoint is kept"
            " (try a lower --lr)"
        )
    return value


class _Loop:
    """State shared by the loops of one tune: data, generator, log, checkpointing."""

    def __init__(
        self,
        backend: DenoiserBackend,
        latents: Tensor,
        masks: Tensor,
        config: TuneConfig,
        checkpointer: Checkpointer | None,
        on_step: StepHook | None,
    ) -> None:
        self.backend, self.x0, self.masks, self.config = backend, latents, masks, config
        self.checkpointer, self.on_step = checkpointer, on_step
        self.generator = torch.Generator().manual_seed(config.seed)
        self.alphas = torch.tensor(backend.schedule.alphas_cumprod, dtype=torch.float64)
        self.losses: list[dict[str, Any]] = []

    def noisy_batch(self, t: int | None = None, x0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x_t = N_s(x_0, eps, t) for every source image (or ``x0``); t random per image unless given."""
        x0 = self.x0 if x0 is None else x0
        b = x0.shape[0]
        n_train = self.backend.schedule.num_train_timesteps
        ts = (
            torch.randint(0, n_train, (b,), generator=self.generator)
            if t is None else torch.full((b,), t, dtype=torch.long)
        )
        eps = self._to_device(torch.randn(x0.shape, generator=self.generator), x0)
        alpha = self._to_device(self.alphas[ts], x0)
        x_t = add_noise(x0, eps, alpha)
        target = training_target(x0, eps, alpha, self.backend.schedule.prediction_type)
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
        """Eq. 5 with the mask on, plain Eq. 2 without."""
        pred, target = pred.float(), target.float()
        return masked_mse(pred, target, self.masks) if self.config.use_mask else F.mse_loss(pred, target)

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


def _adam_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return copy.deepcopy(opt.state_dict())


def _c_s_loss(loop: _Loop, c: Tensor, phi_s: Tensor) -> Callable[..., tuple[Tensor, Tensor]]:
    """Eq. 6 as a function of c_s and the step's inputs: (loss, the Eq. 5 noise term)."""
    backend, cfg = loop.backend, loop.config

    def loss_fn(c_s: Tensor, x_t: Tensor, ts: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        pred = backend.denoise(x_t, ts, splice_subject(c, c_s))
        noise_loss = loop.noise_loss(pred, target)
        if cfg.reg_weight > 0:
            return noise_loss + ridge_to_null(c_s, phi_s, cfg.reg_weight), noise_loss
        return noise_loss, noise_loss

    return loss_fn


READ_BACK_EVERY = 25
"""The c_s loops read their losses back from the device once per this many steps (and
before every checkpoint), instead of twice a step: on a GPU a read-back stalls the queue."""


def _optimise_c_s(loop: _Loop, runner: AdamStep, stage: str, first: int, last: int, t: int | None,
                  checkpoint: Callable[[int], dict[str, Any]] | None = None) -> None:
    """Steps ``first..last-1`` of Eq. 6 on the runner's c_s (global stage: t random; step-wise: t fixed).

    ``runner`` does one Adam step (eager, compiled or a CUDA graph: ``TuneConfig.accel``);
    the noise and timesteps come from the loop's generator whatever the mode.
    ``checkpoint(next_step)`` returns the state to save every ``checkpoint_every`` steps.
    Losses are logged (and checked finite) in batches of :data:`READ_BACK_EVERY`, always
    before a checkpoint is written, so a checkpoint never holds a step after a NaN.
    """
    cfg = loop.config
    pending: list[tuple[int, Tensor, Tensor]] = []
    extra = {"t": t} if t is not None else {}

    def read_back() -> None:
        values = torch.stack([torch.stack([loss, noise]).float() for _, loss, noise in pending]).tolist()
        for (step, _, _), (loss, noise) in zip(pending, values, strict=True):
            loop.log(stage, step, _check_loss(loss, stage, step), noise=noise, **extra)
        pending.clear()

    for step in range(first, last):
        x_t, ts, target = loop.noisy_batch(t)
        loss, noise_loss = runner(x_t, ts, target)
        pending.append((step, loss, noise_loss))
        save = checkpoint is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < last
        if save or len(pending) >= READ_BACK_EVERY or step + 1 == last:
            read_back()
        if save and checkpoint is not None:
            loop.save(checkpoint(step + 1))


def _tune_hifi(loop: _Loop, caption: str, resume: Mapping[str, Any] | None) -> Subject:
    """c_s with Eq. 6 (Adam), then one c_s^t per DDIM step with Algorithm 1."""
    backend, cfg = loop.backend, loop.config
    with torch.no_grad():
        c = backend.encode_text([caption])  # once: never inside the loop
        phi_s = subject_slots(backend.null_embedding(), cfg.num_tokens)[0].float()
    start = phi_s if cfg.reg_weight > 0 else subject_slots(c, cfg.num_tokens)[0].float()
    loss_fn = _c_s_loss(loop, c, phi_s)
    c_s = start.clone().requires_grad_(True)
    runner = AdamStep(loss_fn, c_s, cfg.learning_rate, cfg.accel)
    stepwise: dict[int, Tensor] = {}
    stage, first = "global", 0
    if resume is not None:
        loop.restore(resume)
        with torch.no_grad():
            c_s.copy_(resume["c_s"])
        stepwise = {int(k): v for k, v in resume["stepwise"].items()}
        stage, first = resume["stage"], int(resume["step"])
        if stage == "global":
            runner.load_optimizer(resume["optimizer"])

    def global_state(next_step: int) -> dict[str, Any]:
        return {"stage": "global", "step": next_step, "c_s": c_s.detach().clone(),
                "optimizer": _adam_state(runner.optimizer), "stepwise": {}}

    if stage == "global":
        _optimise_c_s(loop, runner, "global", first, cfg.total_steps, None, global_state)
        first = 0
    global_c_s = c_s.detach().clone()
    # Algorithm 1: for t = T..1, c_s^t starts from c_s^(t+1) and takes I steps at that t,
    # each timestep with a fresh Adam (one runner, restarted: one CUDA graph in graph mode).
    timesteps = ddim_timesteps(backend.schedule, cfg.num_steps) if cfg.stepwise_steps > 0 else ()
    current = stepwise[min(stepwise)].clone() if stepwise else global_c_s.clone()
    c_t = current.clone().requires_grad_(True)
    runner_t: AdamStep | None = None
    for t in timesteps:
        if t in stepwise:
            continue  # finished before an interruption
        runner_t = runner_t or AdamStep(loss_fn, c_t, cfg.learning_rate, cfg.accel)
        runner_t.restart(current)
        _optimise_c_s(loop, runner_t, "stepwise", 0, cfg.stepwise_steps, t)
        current = c_t.detach().clone()
        stepwise[t] = current
        loop.save({"stage": "stepwise", "step": 0, "c_s": global_c_s,
                   "stepwise": {str(k): v for k, v in stepwise.items()}})
    return Subject(class_name="", mode="hifi", c_s=global_c_s, stepwise=stepwise)


def _tune_classic_ti(loop: _Loop, class_name: str, resume: Mapping[str, Any] | None) -> Subject:
    """Textual Inversion (Eq. 2): a new token's input embedding, the text encoder in the loop."""
    backend, cfg = loop.backend, loop.config
    add = getattr(backend, "add_placeholder_token", None)
    init = getattr(backend, "input_embedding", None)
    if add is None or init is None:
        raise HifiError(f"backend {backend.name!r} cannot learn a Textual Inversion token")
    add(PLACEHOLDER)
    try:
        start = init(class_name)
    except HifiError:
        start = init(class_name.split()[-1])  # a multi-token class: start from its last word
    vector = start.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([vector], lr=cfg.learning_rate)
    first = 0
    if resume is not None:
        loop.restore(resume)
        with torch.no_grad():
            vector.copy_(resume["vector"])
        opt.load_state_dict(resume["optimizer"])
        first = int(resume["step"])
    caption = caption_for("classic-ti", class_name)
    for step in range(first, cfg.total_steps):
        x_t, ts, target = loop.noisy_batch()
        c = backend.encode_text([caption], token_embeddings={PLACEHOLDER: vector})
        loss = loop.noise_loss(backend.denoise(x_t, ts, c), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loop.log("global", step, _check_loss(loss, "global", step))
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.total_steps:
            loop.save({"stage": "global", "step": step + 1, "vector": vector.detach().clone(),
                       "optimizer": _adam_state(opt)})
    return Subject(class_name=class_name, mode="classic-ti", token_vector=vector.detach().clone())


def _class_prior(backend: DenoiserBackend, class_name: str, cfg: TuneConfig) -> Tensor:
    """Prior-preservation latents: the frozen model's own images of "a <class>"."""
    plain = Subject(class_name=class_name, mode="dreambooth")
    seeds = [10_000 + cfg.seed * 1_000 + i for i in range(cfg.num_class_images)]
    images = generate(backend, plain, f"a {class_name}", seeds, num_steps=cfg.num_steps).images
    with torch.no_grad():
        return backend.encode_images(images)


def _tune_dreambooth(loop: _Loop, class_name: str, resume: Mapping[str, Any] | None) -> dict[str, Tensor]:
    """DreamBooth: fine-tune the denoiser on "a sks <class>" (optionally with prior preservation)."""
    backend, cfg = loop.backend, loop.config
    with torch.no_grad():
        c = backend.encode_text([caption_for("dreambooth", class_name)])
        c_prior = backend.encode_text([f"a {class_name}"])
    prior = _class_prior(backend, class_name, cfg) if cfg.prior_preservation else None
    params = list(backend.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
    first = 0
    if resume is not None:
        loop.restore(resume)
        backend.load_denoiser_state(resume["denoiser"])
        opt.load_state_dict(resume["optimizer"])
        first = int(resume["step"])
    for p in params:
        p.requires_grad_(True)
    try:
        for step in range(first, cfg.total_steps):
            x_t, ts, target = loop.noisy_batch()
            loss = loop.noise_loss(backend.denoise(x_t, ts, c), target)
            if prior is not None:
                xp, tp, target_p = loop.noisy_batch(x0=prior)
                loss = loss + cfg.prior_weight * F.mse_loss(backend.denoise(xp, tp, c_prior).float(), target_p.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loop.log("global", step, _check_loss(loss, "global", step))
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.total_steps:
                loop.save({"stage": "global", "step": step + 1, "denoiser": backend.denoiser_state(),
                           "optimizer": _adam_state(opt)})
    finally:
        for p in params:
            p.requires_grad_(False)
    return {k: v.clone() for k, v in backend.denoiser_state().items()}


def tune(
    backend: DenoiserBackend,
    images: Tensor,
    class_name: str,
    *,
    masks: Tensor | None = None,
    config: TuneConfig | None = None,
    checkpointer: Checkpointer | None = None,
    on_step: StepHook | None = None,
) -> TuneResult:
    """Learn a subject from its photos.

    Args:
        backend: the model (its weights stay frozen except in ``dreambooth`` mode, which
            fine-tunes the backend's denoiser in place).
        images: ``[B, 3, H, W]`` in [-1, 1] at the backend's resolution, B = 3..6 photos.
        class_name: the subject's class word ("dog").
        masks: ``[B, H, W]`` subject masks in {0, 1} (None: all ones).
        config: the settings (:class:`TuneConfig`).
        checkpointer: where to keep resumable state; if it holds a state, the tune resumes.
        on_step: called after every optimisation step with (stage, step, loss).
    """
    config = config or TuneConfig()
    if images.dim() != 4 or images.shape[1] != 3:
        raise HifiError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if masks is None:
        masks = torch.ones(images.shape[0], *images.shape[-2:])
    if masks.shape[0] != images.shape[0]:
        raise HifiError(f"{masks.shape[0]} masks for {images.shape[0]} images")
    if (masks.flatten(1).sum(dim=1) == 0).any():
        raise HifiError("a subject mask is empty: every pixel is background")
    with torch.no_grad():
        latents = backend.encode_images(images)
    latent_masks = resize_mask(masks.to(latents.device, torch.float32), (latents.shape[-2], latents.shape[-1]))
    loop = _Loop(backend, latents, latent_masks, config, checkpointer, on_step)
    resume = checkpointer.load() if checkpointer is not None else None
    if resume is not None and _same_run(resume.get("config")) != _same_run(config.resolved()):
        raise HifiError(
            "the checkpoint was made with other settings; resume with the same flags, or start"
            f" a new run folder (saved: {resume.get('config')}, now: {config.resolved()})"
        )
    caption = caption_for(config.mode, class_name)
    denoiser_state = None
    if config.mode == "hifi":
        subject = attrs.evolve(_tune_hifi(loop, caption, resume), class_name=class_name)
    elif config.mode == "classic-ti":
        subject = _tune_classic_ti(loop, class_name, resume)
    else:
        denoiser_state = _tune_dreambooth(loop, class_name, resume)
        subject = Subject(class_name=class_name, mode="dreambooth")
    return TuneResult(subject=subject, losses=loop.losses, caption=caption, denoiser_state=denoiser_state)
