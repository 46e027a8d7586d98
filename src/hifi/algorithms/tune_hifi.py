"""HiFi Tuner's subject learning (Section 3.2): c_s by Eq. 6, then step-wise c_s^t by Algorithm 1.

c_s is n tokens in the text encoder's *output* space, spliced into the last n positions of
the caption embedding, ``[c, c_s]``; it starts from phi_s (the null embedding's last n
positions) and is pulled towards it by the ridge-to-null term of Eq. 6. The caption is
encoded once: the text encoder never runs inside these loops. Every Adam step goes
through a runner from the optimiser-step factory that arrives from the edge
(:mod:`hifi.execution.edge`), so a captured graph can replay it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from hifi.algorithms.subject import Subject
from hifi.algorithms.tune_loop import TuneLoop, adam_state, check_loss
from hifi.execution.edge import Bound, StepFactory
from hifi.execution.fastpath import AdamStep
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import DdimGrid, Timestep, timestep_from_text, timestep_text
from hifi.kernels.losses import noise_loss, ridge_to_null, splice_subject, subject_slots
from hifi.protocols.denoiser import Model

__all__ = ["READ_BACK_EVERY", "c_s_loss", "optimise_c_s", "stepwise_subject", "tune_hifi"]

READ_BACK_EVERY = 25
"""The c_s loops read their losses back from the device once per this many steps (and
before every checkpoint), instead of twice a step: on a GPU a read-back stalls the queue."""


def c_s_loss(
    model: Model, reg_weight: float, c_s: Tensor, x_t: Tensor, ts: Tensor, target: Tensor, c: Condition,
    phi_s: Tensor, *mask: Tensor,
) -> tuple[Tensor, Tensor]:
    """Eq. 6: ``||M * (eps_theta(x_t, [c, c_s]) - eps)||^2 + w_s ||c_s - phi_s||^2``, and its noise term.

    The noise term is Eq. 5 with ``mask`` (the latent-grid M) and plain Eq. 2 without it;
    ``reg_weight`` is w_s (0 switches the regulariser off). A function of tensors only after
    its two fixed arguments: the step a runner captures (and the benchmark times).
    """
    noise = noise_loss(model(x_t, ts, splice_subject(c, c_s)), target, *mask)
    if reg_weight > 0:
        return noise + ridge_to_null(c_s, phi_s, reg_weight), noise
    return noise, noise


def optimise_c_s(loop: TuneLoop, runner: AdamStep, extras: tuple[Any, ...], stage: str, first: int, last: int,
                 t: Timestep | None, checkpoint: Callable[[int], dict[str, Any]] | None = None) -> None:
    """Steps ``first..last-1`` of Eq. 6 on the runner's c_s (global stage: t random; step-wise: t fixed).

    Each step's noisy batch comes from the loop's generator whatever the execution mode;
    ``extras`` are the inputs of :func:`c_s_loss` after the batch (c, phi_s and the mask).
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
            loop.log(stage, step, check_loss(loss, stage, step), noise=noise, **extra)
        pending.clear()

    for step in range(first, last):
        x_t, ts, target = loop.noisy_batch(t)
        loss, noise = runner(x_t, ts, target, *extras)
        pending.append((step, loss, noise))
        save = checkpoint is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < last
        if save or len(pending) >= READ_BACK_EVERY or step + 1 == last:
            read_back()
        if save and checkpoint is not None:
            loop.save(checkpoint(step + 1))


def stepwise_subject(
    loop: TuneLoop, optimiser: StepFactory, loss: Callable[..., tuple[Tensor, Tensor]], extras: tuple[Any, ...],
    c_s: Tensor, done: Mapping[Timestep, Tensor] | None = None,
) -> dict[Timestep, Tensor]:
    """Algorithm 1: one c_s^t per DDIM timestep, t = T..1, each from c_s^(t+1) by I steps of Eq. 6 at t.

    c_s^(T+1) is the global c_s; every timestep starts a fresh Adam (``optimiser`` makes or
    restarts the runner). ``done`` holds the c_s^t finished before an interruption; the
    state is checkpointed after every timestep. Returns ``{t: c_s^t}``.
    """
    cfg = loop.config
    stepwise = dict(done or {})
    grid = DdimGrid.build(loop.backend.schedule, cfg.num_steps)
    current = stepwise[min(stepwise)].clone() if stepwise else c_s.clone()
    for t in grid.timesteps:
        if t in stepwise:
            continue  # finished before an interruption
        runner = optimiser(loss, current, cfg.learning_rate)
        optimise_c_s(loop, runner, extras, "stepwise", 0, cfg.stepwise_steps, t)
        current = runner.param.detach().clone()
        stepwise[t] = current
        loop.save({"stage": "stepwise", "step": 0, "c_s": c_s,
                   "stepwise": {timestep_text(k): v for k, v in stepwise.items()}})
    return stepwise


def tune_hifi(loop: TuneLoop, caption: str, optimiser: StepFactory, resume: Mapping[str, Any] | None) -> Subject:
    """c_s with Eq. 6 (Adam), then, with ``stepwise_steps > 0``, one c_s^t per DDIM step (Algorithm 1)."""
    backend, cfg = loop.backend, loop.config
    with torch.no_grad():
        c = backend.encode_text([caption])  # once: never inside the loop
        phi_s = subject_slots(backend.null_embedding(), cfg.num_tokens)[0].float()
    start = phi_s if cfg.reg_weight > 0 else subject_slots(c, cfg.num_tokens)[0].float()
    loss = Bound(c_s_loss, loop.model, cfg.reg_weight)
    extras = (c, phi_s, *(() if loop.masks is None else (loop.masks,)))
    runner = optimiser(loss, start, cfg.learning_rate)
    done: dict[Timestep, Tensor] = {}
    stage, first = "global", 0
    if resume is not None:
        loop.restore(resume)
        with torch.no_grad():
            runner.param.copy_(resume["c_s"])
        done = {timestep_from_text(k): v for k, v in resume["stepwise"].items()}
        stage, first = resume["stage"], int(resume["step"])
        if stage == "global":
            runner.load_optimizer(resume["optimizer"])

    def global_state(next_step: int) -> dict[str, Any]:
        return {"stage": "global", "step": next_step, "c_s": runner.param.detach().clone(),
                "optimizer": adam_state(runner.optimizer), "stepwise": {}}

    if stage == "global":
        optimise_c_s(loop, runner, extras, "global", first, cfg.total_steps, None, global_state)
    global_c_s = runner.param.detach().clone()
    stepwise = stepwise_subject(loop, optimiser, loss, extras, global_c_s, done) if cfg.stepwise_steps > 0 else {}
    return Subject(class_name="", mode="hifi", c_s=global_c_s, stepwise=stepwise)
