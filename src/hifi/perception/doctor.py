"""What ``hifi doctor`` reports: the runtime's versions, and every perception model and backend.

For each: what weights it loads, where they are configured, whether they are on this
machine, and the device it would run on. Builds nothing.
"""

from __future__ import annotations

import importlib.metadata as metadata
from collections.abc import Sequence

import torch

from hifi.perception.models import BundledModel, ModelSlot, locate_model
from hifi.perception.registry import Factory, available_perception, perception_factory
from hifi.registry import available_backends, default_device

__all__ = ["doctor_report", "runtime_versions"]


def runtime_versions() -> dict[str, str]:
    """Versions of the packages the models run on, and the device they would use."""
    versions = {}
    for package in ("torch", "diffusers", "transformers", "segment-anything", "groundingdino-py", "xformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    versions["device"] = default_device()
    versions["cuda device"] = cuda
    return versions


_SD, _SDXL = ("Stable Diffusion", "HIFI_SD_MODEL"), ("Stable Diffusion XL", "HIFI_SDXL_MODEL")
_SD3 = ("Stable Diffusion 3", "HIFI_SD3_MODEL")
_SD_BACKENDS = {"sd14": _SD, "sd14-fp16": _SD, "sdxl": _SDXL, "sdxl-fp16": _SDXL, "sd3": _SD3, "sd3-fp16": _SD3}
"""Backends that read their weights from an environment variable (hifi_backends.stable_diffusion, .sdxl)."""

Slot = ModelSlot | BundledModel
"""What a factory lists in its ``model_slots``."""


def _backend_slots(name: str, factory: Factory | None) -> tuple[Slot, ...]:
    slots: tuple[Slot, ...] = getattr(factory, "model_slots", ())
    if not slots and name in _SD_BACKENDS:
        return (ModelSlot(*_SD_BACKENDS[name]),)
    return slots


def _slot_row(slot: Slot) -> dict[str, str]:
    """The ``what``, ``model``, ``configured`` and ``found`` of one slot."""
    if isinstance(slot, BundledModel):
        return {"what": slot.what, "model": str(slot.folder), "configured": "bundled",
                "found": locate_model(str(slot.folder))}
    source, origin = slot.configured()
    return {"what": slot.what, "model": source or "-",
            "configured": origin if source else f"not configured: set ${slot.env}", "found": locate_model(source)}


def doctor_report() -> list[dict[str, str]]:
    """One row per perception model and backend: what is configured, whether it is here, the device.

    Keys: ``kind``, ``name``, ``what``, ``model`` (the source in force), ``configured``
    (``$ENV``, ``default``, ``bundled``, ``not configured: set $ENV`` or ``nothing to configure``),
    ``found`` (:func:`~hifi.perception.models.locate_model`), ``device``. Builds nothing; a
    factory that cannot even be imported gets a row saying why.
    """
    device = default_device()
    rows: list[dict[str, str]] = []

    def add(kind: str, name: str, slots: Sequence[Slot], without: str = "no weights") -> None:
        if not slots:
            rows.append({"kind": kind, "name": name, "what": without, "model": "-",
                         "configured": "nothing to configure", "found": "built in", "device": device})
        for slot in slots:
            rows.append({"kind": kind, "name": name, **_slot_row(slot), "device": device})

    for kind, names in available_perception().items():
        for name in names:
            try:
                factory = perception_factory(kind, name)
            except Exception as err:  # a broken optional install must not stop the report
                rows.append({"kind": kind[:-1], "name": name, "what": "?", "model": "-", "configured": "-",
                             "found": f"cannot import ({type(err).__name__}: {err})", "device": device})
                continue
            add(kind[:-1], name, getattr(factory, "model_slots", ()))
    backends = {ep.name: ep for ep in metadata.entry_points(group="hifi.backends")}
    for name in available_backends():
        ep = backends.get(name)
        backend_factory: Factory | None = None
        try:
            backend_factory = ep.load() if ep is not None else None
        except Exception:  # load_backend reports a broken backend; here only the slots matter
            pass
        add("backend", name, _backend_slots(name, backend_factory), without="random weights")
    return rows
