"""Fixed-shape optimisation steps run eagerly, compiled, or replayed from a CUDA graph.

The inner loops of the method optimise one small tensor against a frozen UNet with inputs
whose shapes never change: c_s in Eq. 6 (the global stage and every step of Algorithm 1),
phi_h in Eq. 10 (Algorithm 2), phi_t in Eq. 4 (null-text inversion). On a GPU at batch 1
such a step is dominated by kernel launches, so capturing the whole step (forward,
backward, Adam) once and replaying it removes most of its cost. The same holds for the
no-gradient forwards of sampling and inversion (the CFG forward of Eq. 1 and 7).

:class:`AdamStep` is that step, and :class:`StaticCall` (:func:`accelerate_model`) that
forward, each in one of three modes (:data:`ACCEL_MODES`):

- ``"eager"``: plain PyTorch, the reference.
- ``"compile"``: the loss function through ``torch.compile`` (on CUDA with
  ``mode="reduce-overhead"``, which replays CUDA graphs); Adam stays eager. Any device.
- ``"graph"``: forward, backward and a ``capturable`` Adam captured in one
  ``torch.cuda.CUDAGraph`` on the first call and replayed after; CUDA only. The warm-up
  iterations capture needs are undone (the tensor and Adam's state are put back), so the
  sequence of values is the eager one, up to floating-point reordering.

Inputs are tensors or pytrees of tensors (a :class:`~hifi.kernels.condition.Condition`
is one): a graph copies their leaves. Each mode takes the same inputs in the same order,
drawn by the caller from its own seeded generator, so a switch of mode changes the speed,
not the random stream; tests check the modes agree within tolerance (``tests/test_fastpath.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from hifi.errors import HifiError

__all__ = ["ACCEL_MODES", "Accel", "AdamStep", "StaticCall", "accelerate_model", "check_accel", "timestep_tensor"]

Accel = Literal["eager", "compile", "graph"]
ACCEL_MODES: tuple[str, ...] = get_args(Accel)

LossFn = Callable[..., tuple[Tensor, ...]]
"""``fn(param, *inputs) -> (loss, *extras)``: the first output is minimised."""


def check_accel(accel: str, device: torch.device | str) -> Accel:
    """``accel`` if it is a mode this device can run, else a clear :class:`HifiError`."""
    if accel not in ACCEL_MODES:
        raise HifiError(f"unknown --accel {accel!r}: choose one of {', '.join(ACCEL_MODES)}")
    if accel == "graph" and torch.device(device).type != "cuda":
        raise HifiError(f"--accel graph captures CUDA graphs and needs a CUDA device (this backend is on {device});"
                        " use --accel compile or eager")
    return cast(Accel, accel)


class AdamStep:
    """One Adam step on ``param`` minimising ``fn(param, *inputs)[0]``, in the chosen mode.

    ``param`` is a leaf tensor with ``requires_grad``; it is updated in place. Call the
    object with the step's inputs; it returns the outputs of ``fn`` detached (the loss
    first). :meth:`restart` starts a fresh Adam from a new value (Algorithm 1 does so at
    every timestep); :meth:`load_optimizer` resumes a saved one.
    """

    def __init__(self, fn: LossFn, param: Tensor, lr: float, accel: str = "eager") -> None:
        mode = check_accel(accel, param.device)
        if not param.requires_grad or not param.is_leaf:
            raise HifiError("AdamStep needs a leaf tensor with requires_grad")
        self.fn, self.param, self.accel = fn, param, mode
        self.optimizer = torch.optim.Adam([param], lr=lr, capturable=mode == "graph")
        self._compiled: LossFn | None = None
        self._graph: Any = None
        self._static: _StaticInputs | None = None
        self._static_out: tuple[Tensor, ...] = ()
        if mode == "compile":
            how = "reduce-overhead" if param.device.type == "cuda" else None
            self._compiled = cast(LossFn, torch.compile(fn, mode=how, dynamic=False))

    # -- state --------------------------------------------------------------------------------

    def restart(self, value: Tensor) -> None:
        """Set the tensor to ``value`` and Adam to its fresh state (step 0, zero moments)."""
        with torch.no_grad():
            self.param.copy_(value)
        if self._graph is None:
            self.optimizer.state.clear()  # exactly a new Adam
            return
        for state in self.optimizer.state.values():  # a graph replays on these very tensors
            for tensor in state.values():
                tensor.zero_()

    def load_optimizer(self, saved: Mapping[str, Any]) -> None:
        """Adam's state from :meth:`torch.optim.Optimizer.state_dict` (e.g. a checkpoint)."""
        if self._graph is not None:
            raise HifiError("load the optimizer state before the first step of a graph")
        self.optimizer.load_state_dict(dict(saved))
        if self.accel == "graph":
            for state in self.optimizer.state.values():
                if "step" in state:  # capturable Adam keeps its step count on the device
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=self.param.device)

    # -- the step -----------------------------------------------------------------------------

    def __call__(self, *inputs: Any) -> tuple[Tensor, ...]:
        with torch.enable_grad():  # a step differentiates, whatever the caller's mode
            if self.accel == "graph":
                return self._replay(inputs)
            fn = self._compiled if self._compiled is not None else self.fn
            outputs = fn(self.param, *inputs)
            self.optimizer.zero_grad(set_to_none=True)
            outputs[0].backward()
            self.optimizer.step()
            return tuple(o.detach() for o in outputs)

    def _replay(self, inputs: tuple[Any, ...]) -> tuple[Tensor, ...]:
        if self._graph is None:
            self._capture(inputs)
        assert self._static is not None
        self._static.load(inputs)
        self._graph.replay()
        return tuple(o.clone() for o in self._static_out)

    def _capture(self, inputs: tuple[Any, ...], warmup: int = 3) -> None:
        """Capture forward, backward and Adam in one CUDA graph (PyTorch's whole-network recipe)."""
        self._static = _StaticInputs(inputs)
        static_in = self._static.values
        before = self.param.detach().clone()
        fresh = not self.optimizer.state
        saved = {k: (v.clone() if isinstance(v, Tensor) else v)
                 for state in self.optimizer.state.values() for k, v in state.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lets autograd and Adam allocate their state
            for _ in range(warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self.fn(self.param, *static_in)[0].backward()
                self.optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            outputs = self.fn(self.param, *static_in)
            outputs[0].backward()
            self.optimizer.step()
        self._graph, self._static_out = graph, tuple(o.detach() for o in outputs)
        # Undo the warm-up: the value and Adam's state as they were before it.
        with torch.no_grad():
            self.param.copy_(before)
            for state in self.optimizer.state.values():
                for key, tensor in state.items():
                    if fresh:
                        tensor.zero_()
                    else:
                        tensor.copy_(torch.as_tensor(saved[key], dtype=tensor.dtype, device=tensor.device))


class _StaticInputs:
    """A graph's static inputs: detached copies of a call's tensors (or pytrees of them), with their leaves and
    structure kept from the capture, so that a replay flattens only the new inputs."""

    def __init__(self, inputs: tuple[Any, ...]) -> None:
        self.values: tuple[Any, ...] = pytree.tree_map(lambda x: x.detach().clone(), inputs)
        self.leaves, self.spec = pytree.tree_flatten(self.values)

    def load(self, inputs: tuple[Any, ...], leaves: list[Tensor] | None = None) -> None:
        """Copy ``inputs`` (or their ``leaves``, already flattened and of this structure) into the static tensors."""
        if leaves is None:
            leaves, spec = pytree.tree_flatten(inputs)
            if spec != self.spec:
                raise HifiError("a captured step was called with inputs of another structure than it was captured with")
        for target, value in zip(self.leaves, leaves, strict=True):
            target.copy_(value, non_blocking=True)


# -- no-gradient forwards -------------------------------------------------------------------


def timestep_tensor(t: int | float | Tensor, device: torch.device) -> Tensor:
    """A timestep as a 0-d tensor on ``device`` (a graph's input instead of a baked-in number): int64,
    or float32 for a flow's ``sigma * N``."""
    if isinstance(t, Tensor):
        return t.to(device)
    return torch.as_tensor(t, dtype=torch.float32 if isinstance(t, float) else torch.int64, device=device)


class StaticCall:
    """``fn(*inputs)`` without gradients, eagerly, compiled, or replayed from a CUDA graph.

    In ``"graph"`` mode each new combination of input shapes and dtypes is captured once
    (after a warm-up call on a side stream, as PyTorch's recipe asks) and replayed after:
    the inputs are copied into the graph's static tensors and the outputs cloned out, so a
    caller may keep them. Calls made while gradients are enabled run ``fn`` eagerly: a
    captured graph has no autograd. Every input must be a tensor on the graph's device, or
    a pytree of them (a :class:`~hifi.kernels.condition.Condition`).
    """

    def __init__(self, fn: Callable[..., Tensor], device: torch.device | str, accel: str = "eager") -> None:
        self.fn, self.device = fn, torch.device(device)
        self.accel = check_accel(accel, self.device)
        self._compiled: Callable[..., Tensor] | None = None
        self._graphs: dict[tuple[Any, ...], tuple[Any, _StaticInputs, Tensor]] = {}
        if self.accel == "compile":
            how = "reduce-overhead" if self.device.type == "cuda" else None
            self._compiled = cast(Callable[..., Tensor], torch.compile(fn, mode=how, dynamic=False))

    def __call__(self, *inputs: Any) -> Tensor:
        if torch.is_grad_enabled() or self.accel == "eager":
            return self.fn(*inputs)
        if self._compiled is not None:
            return self._compiled(*inputs).clone()
        leaves, spec = pytree.tree_flatten(inputs)
        key = (spec, *((tuple(x.shape), x.dtype) for x in leaves))
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs)
        graph, static_in, static_out = self._graphs[key]
        static_in.load(inputs, leaves)  # the key holds the structure: the leaves fit
        graph.replay()
        return static_out.clone()

    def _capture(self, inputs: tuple[Any, ...]) -> tuple[Any, _StaticInputs, Tensor]:
        static = _StaticInputs(inputs)
        static_in = static.values
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(*static_in)  # warm-up: lazy initialisation and workspace allocation
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(*static_in)
        return graph, static, static_out


def accelerate_model(model: Callable[[Tensor, Any, Any], Tensor], device: torch.device | str,
                     accel: str = "eager") -> Callable[[Tensor, Any, Any], Tensor]:
    """A denoiser ``model(x_t, t, cond)`` whose no-gradient calls run in mode ``accel``.

    The timestep becomes a device tensor, so one captured graph serves every step of a
    loop; calls with gradients enabled go to ``model`` itself. ``"eager"`` returns
    ``model`` unchanged.
    """
    if check_accel(accel, device) == "eager":
        return model
    dev = torch.device(device)
    call = StaticCall(lambda x, t, cond: model(x, t, cond), dev, accel)

    def fast(x: Tensor, t: Any, cond: Any) -> Tensor:
        return call(x, timestep_tensor(t, dev), cond)

    return fast
