"""The execution mode, chosen once at the edge and handed to the algorithms as ready objects.

An algorithm of :mod:`hifi.algorithms` takes a model callable ``model(x_t, t, cond)`` and,
where it optimises a tensor, a :data:`StepFactory` that makes the optimiser-step runner;
it never learns how either runs (k-diffusion's contract: "the model is any callable"). A
workflow or the command line builds one :class:`Execution` per run and passes
``execution.model(backend.denoise)`` and ``execution.runner`` down; the algorithms' defaults
(``backend.denoise`` itself and :func:`adam_steps`) are plain PyTorch, the reference every
other mode is tested against.

In ``"graph"`` mode the model's no-gradient forwards are captured once per input shape and
the runners once per loss and shape, for the whole run: a second image with the same
shapes replays the graphs of the first (the runner is restarted from its new value, which
is exactly a fresh Adam).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor

from hifi.execution.fastpath import AdamStep, LossFn, accelerate_model, check_accel
from hifi.protocols.denoiser import ChannelsLastBackend, DenoiserBackend, Model

__all__ = ["Bound", "Execution", "StepFactory", "adam_steps", "execution_for"]

StepFactory = Callable[[LossFn, Tensor, float], AdamStep]
"""``factory(loss, start, lr)``: a runner of Adam steps minimising ``loss(param, *inputs)[0]``
over a parameter that starts at ``start`` (a float32 leaf the runner owns, ``runner.param``)."""


@attrs.frozen(init=False)
class Bound:
    """``fn`` with its leading arguments fixed: ``Bound(f, a, b)(p, *x) == f(a, b, p, *x)``.

    Unlike ``functools.partial`` two of them are equal when their function and arguments are,
    so a runner made for one image serves the next (:meth:`Execution.runner`).
    """

    fn: Callable[..., Any]
    fixed: tuple[Any, ...]

    def __init__(self, fn: Callable[..., Any], *fixed: Any) -> None:
        self.__attrs_init__(fn, fixed)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*self.fixed, *args)


def _leaf(start: Tensor) -> Tensor:
    """The parameter a runner owns: a float32 copy of ``start`` that requires grad."""
    return start.detach().float().clone().requires_grad_(True)


def adam_steps(loss: LossFn, start: Tensor, lr: float) -> AdamStep:
    """The eager step factory: a fresh :class:`AdamStep` on a copy of ``start`` for every call."""
    return AdamStep(loss, _leaf(start), lr)


class Execution:
    """How one run's model forwards and optimiser steps run: ``"eager"``, ``"compile"`` or ``"graph"``.

    :meth:`model` wraps a denoiser once (cached); :meth:`runner` is a :data:`StepFactory`
    that keeps one runner per (loss, parameter shape, device, learning rate) for the run.
    """

    def __init__(self, mode: str = "eager", device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.mode = check_accel(mode, self.device)
        self._models: dict[Model, Model] = {}
        self._runners: dict[tuple[Any, ...], AdamStep] = {}

    def model(self, fn: Model) -> Model:
        """``fn``, whose no-gradient calls run in this mode (calls with gradients go to ``fn``)."""
        if fn not in self._models:  # bound methods of one object compare equal: backend.denoise is one key
            self._models[fn] = accelerate_model(fn, self.device, self.mode)
        return self._models[fn]

    def runner(self, loss: LossFn, start: Tensor, lr: float) -> AdamStep:
        """The run's runner for ``loss`` at this shape, restarted from ``start`` (a fresh Adam)."""
        key = (loss, tuple(start.shape), start.device, lr)
        runner = self._runners.get(key)
        if runner is None:
            runner = AdamStep(loss, _leaf(start), lr, self.mode)
            self._runners[key] = runner
        else:
            runner.restart(start.detach().float())
        return runner

    @property
    def runners_made(self) -> int:
        """How many runners (so, in graph mode, step graphs) this run has made."""
        return len(self._runners)


def execution_for(backend: DenoiserBackend, mode: str = "eager") -> Execution:
    """The :class:`Execution` of ``mode`` on ``backend``'s device; a clear error for a mode it cannot run.

    In graph mode on CUDA a backend that can (:class:`ChannelsLastBackend`) is switched to
    channels-last first: graphs replay cuDNN's convolutions, and channels-last spares them
    their transposes (an H100, SD1.4 bf16: c_s step 17.1 ms vs 21.1 ms,
    ``benchmarks/results/sd14-gpu-bf16-layout.md``).
    """
    execution = Execution(mode, backend.device)
    if execution.mode == "graph" and backend.device.type == "cuda" and isinstance(backend, ChannelsLastBackend):
        backend.set_channels_last()
    return execution
