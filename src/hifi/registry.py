"""Backends by name.

Backends live in other packages (``hifi_backends`` ships ``tiny``, ``sd14``, ``sd14-fp16``,
``sdxl``, ``sdxl-fp16``, ``tiny-sdxl``, ``sd3``, ``sd3-fp16``, ``tiny-sd3`` and ``toy``) and
announce themselves through the ``hifi.backends`` entry-point group, so the core never
imports them. An embedding product can also register a factory at run time with
:func:`register_backend`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any

from hifi.errors import HifiError
from hifi.protocols.denoiser import DenoiserBackend
from hifi.protocols.perception import PerceptionPreferences

__all__ = [
    "available_backends",
    "backend_options",
    "backend_perception_defaults",
    "check_device",
    "default_device",
    "load_backend",
    "register_backend",
]

BackendFactory = Callable[..., DenoiserBackend]

_REGISTERED: dict[str, BackendFactory] = {}
_ENTRY_POINT_GROUP = "hifi.backends"


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make ``factory(**options)`` available as backend ``name`` (overrides an entry point)."""
    _REGISTERED[name] = factory


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=_ENTRY_POINT_GROUP)}


def available_backends() -> dict[str, str]:
    """Backend names and where each comes from (``module:function``)."""
    found = {name: ep.value for name, ep in _entry_points().items()}
    for name, factory in _REGISTERED.items():
        found[name] = f"{factory.__module__}:{getattr(factory, '__qualname__', factory)}"
    return dict(sorted(found.items()))


def default_device() -> str:
    """``cuda`` when this machine has a usable CUDA device, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: Any) -> None:
    """A clear :class:`HifiError` if ``device`` (``"cpu"``, ``"cuda:1"``, a torch.device...) is not on this machine."""
    import torch

    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise HifiError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from err
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise HifiError(f"device {str(device)!r} was asked for, but this machine has no usable CUDA device"
                            f" (torch {torch.__version__}); use --device cpu")
        if where.index is not None and where.index >= torch.cuda.device_count():
            raise HifiError(f"device {str(device)!r} was asked for, but this machine has"
                            f" {torch.cuda.device_count()} CUDA device(s)")
    elif where.type == "mps" and not torch.backends.mps.is_available():
        raise HifiError(f"device {str(device)!r} was asked for, but this machine has no MPS device; use --device cpu")


def backend_options(model: str | None) -> dict[str, Any]:
    """The factory options a model id names: ``random:tiny[:SEED]``, ``random:tiny-sdxl[:SEED]`` or
    ``random:tiny-sd3[:SEED]`` (how a run records a tiny backend, whose weights are its seed) is ``seed``,
    any other id ``model``."""
    for tiny in ("random:tiny-sdxl", "random:tiny-sd3", "random:tiny"):
        if model and model.startswith(tiny):
            seed = model.removeprefix(tiny).removeprefix(":") or "0"
            if not seed.isdigit():
                raise HifiError(f"model {model!r}: a tiny backend's model is {tiny} or {tiny}:SEED,"
                                " SEED a whole number >= 0")
            return {"seed": int(seed)}
    return {"model": model} if model else {}


def load_backend(name: str, **options: Any) -> DenoiserBackend:
    """Build backend ``name``; ``options`` go to its factory (``model``, ``device``, ``seed``...).

    Raises :class:`HifiError` naming the known backends when ``name`` is unknown, and when
    ``device`` is not on this machine.
    """
    if options.get("device") is not None:
        check_device(options["device"])
    factory = _REGISTERED.get(name)
    if factory is None:
        ep = _entry_points().get(name)
        if ep is None:
            known = ", ".join(available_backends()) or "none (is hifi installed with pip?)"
            raise HifiError(f"unknown backend {name!r}; known backends: {known}")
        factory = ep.load()
    return factory(**options)


def _factory(name: str) -> BackendFactory | None:
    factory = _REGISTERED.get(name)
    if factory is None:
        ep = _entry_points().get(name)
        factory = ep.load() if ep is not None else None
    return factory


def backend_perception_defaults(name: str) -> dict[str, str]:
    """The perception models a backend asks for (``segmenter``, ``embedder``, ``clip``), without building it.

    A factory announces them by declaring :class:`~hifi.protocols.perception.PerceptionPreferences`
    (the ``toy`` backend names ToyWorld's own models); most backends announce none and get the paper's.
    """
    factory = _factory(name)
    return dict(factory.perception_defaults) if isinstance(factory, PerceptionPreferences) else {}
