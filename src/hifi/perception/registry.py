"""Perception models by name: segmenters, image embedders and captioners (Section 3.3).

The protocols live in :mod:`hifi.protocols.perception`; this module finds implementations,
as :mod:`hifi.registry` finds denoiser backends. The weight-free ones
(:mod:`hifi.perception.builtin`) are built in:

- segmenters ``attention`` (cross-attention maps of the generation, the default) and
  ``folder`` (masks from a folder, option ``folder``);
- embedder ``vae-latent`` (option ``backend``); captioner ``template``.

Model-backed ones live in ``hifi_backends.perception`` and announce themselves through
the entry-point groups ``hifi.segmenters``, ``hifi.embedders`` and ``hifi.captioners``:
``grounded-sam``, ``sam``, ``dino``, ``clip``, ``blip2``, ``blip``. Every factory takes
the options ``model`` (a local folder, a checkpoint file, a hub id, or ``random:tiny``
for a random tiny model built from a config), ``device`` and ``backend``, plus its own.
Without ``model`` a factory reads the environment variable of its slot
(:mod:`hifi.perception.models`), then its default hub id. Missing weights raise
:class:`~hifi.errors.ModelNotFoundError` in one line that names the variable to set.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hifi.errors import HifiError
from hifi.perception.builtin import AttentionSegmenter, FolderSegmenter, TemplateCaptioner, VaeLatentEmbedder
from hifi.perception.models import (
    BLIP2_MODEL_ENV,
    BLIP_MODEL_ENV,
    DINO_MODEL_ENV,
    GROUNDING_DINO_MODEL_ENV,
    SAM_CHECKPOINT_ENV,
    SAM_MODEL_ENV,
)
from hifi.protocols.denoiser import DenoiserBackend
from hifi.protocols.perception import Captioner, ImageEmbedder, Perception, PerceptionPreferences, Segmenter

__all__ = [
    "CAPTIONERS",
    "EMBEDDERS",
    "SEGMENTERS",
    "available_perception",
    "configured_perception",
    "configured_segmenter",
    "load_captioner",
    "load_embedder",
    "load_segmenter",
    "perception_factory",
    "register_captioner",
    "register_embedder",
    "register_segmenter",
]

SEGMENTERS, EMBEDDERS, CAPTIONERS = "segmenters", "embedders", "captioners"
_KINDS = (SEGMENTERS, EMBEDDERS, CAPTIONERS)

Factory = Callable[..., Any]


# Built-in, weight-free -------------------------------------------------------------------


def _no_model(name: str, model: str | None) -> None:
    if model:
        raise HifiError(f"the {name} perception model has no weights and loads no model; drop model={model!r}")


def _attention(*, model: str | None = None, device: str | None = None, backend: DenoiserBackend | None = None,
               **options: Any) -> AttentionSegmenter:
    _no_model("attention", model)
    return AttentionSegmenter(**options)


def _folder(*, folder: str | Path | None = None, names: Sequence[str] | None = None, model: str | None = None,
            device: str | None = None, backend: DenoiserBackend | None = None) -> FolderSegmenter:
    folder = folder or model  # the folder may come as `model`, like every other source
    if not folder:
        raise HifiError("the folder segmenter needs folder=DIR (one mask per photo, same file names)")
    if not Path(folder).is_dir():
        raise HifiError(f"mask folder {folder} does not exist")
    return FolderSegmenter(Path(folder), None if names is None else tuple(names))


def _vae_latent(*, model: str | None = None, device: str | None = None, backend: DenoiserBackend | None = None,
                **options: Any) -> VaeLatentEmbedder:
    _no_model("vae-latent", model)
    if backend is None:
        raise HifiError("the vae-latent embedder embeds with a backend's VAE: pass backend=")
    return VaeLatentEmbedder(backend, **options)


def _template(*, model: str | None = None, device: str | None = None, backend: DenoiserBackend | None = None,
              **options: Any) -> TemplateCaptioner:
    _no_model("template", model)
    return TemplateCaptioner(**options)


_BUILTIN: dict[str, dict[str, Factory]] = {
    SEGMENTERS: {"attention": _attention, "folder": _folder},
    EMBEDDERS: {"vae-latent": _vae_latent},
    CAPTIONERS: {"template": _template},
}
_REGISTERED: dict[str, dict[str, Factory]] = {kind: {} for kind in _KINDS}


# Registry --------------------------------------------------------------------------------


def _entry_points(kind: str) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=f"hifi.{kind}")}


def _source(factory: Factory) -> str:
    return f"{factory.__module__}:{getattr(factory, '__qualname__', type(factory).__qualname__)}"


def _available(kind: str) -> dict[str, str]:
    found = {name: _source(f) for name, f in _BUILTIN[kind].items()}
    found.update({name: ep.value for name, ep in _entry_points(kind).items()})
    found.update({name: _source(f) for name, f in _REGISTERED[kind].items()})
    return dict(sorted(found.items()))


def available_perception() -> dict[str, dict[str, str]]:
    """``{"segmenters": {name: module:function}, "embedders": ..., "captioners": ...}``."""
    return {kind: _available(kind) for kind in _KINDS}


def perception_factory(kind: str, name: str) -> Factory:
    """The factory of perception model ``name`` of ``kind`` (``segmenters``, ...), loaded but not called."""
    if name in _REGISTERED[kind]:
        return _REGISTERED[kind][name]
    ep = _entry_points(kind).get(name)
    if ep is not None:
        factory: Factory = ep.load()
        return factory
    if name in _BUILTIN[kind]:
        return _BUILTIN[kind][name]
    raise HifiError(f"unknown {kind[:-1]} {name!r}; known {kind}: {', '.join(_available(kind))}")


def _register(kind: str, name: str, factory: Factory) -> None:
    _REGISTERED[kind][name] = factory


def register_segmenter(name: str, factory: Callable[..., Segmenter]) -> None:
    """Make ``factory(**options)`` available as segmenter ``name`` (overrides an entry point)."""
    _register(SEGMENTERS, name, factory)


def register_embedder(name: str, factory: Callable[..., ImageEmbedder]) -> None:
    """Make ``factory(**options)`` available as embedder ``name`` (overrides an entry point)."""
    _register(EMBEDDERS, name, factory)


def register_captioner(name: str, factory: Callable[..., Captioner]) -> None:
    """Make ``factory(**options)`` available as captioner ``name`` (overrides an entry point)."""
    _register(CAPTIONERS, name, factory)


def load_segmenter(name: str, **options: Any) -> Segmenter:
    """Build segmenter ``name`` (``attention``, ``folder``, ``grounded-sam``, ``sam`` ...)."""
    segmenter: Segmenter = perception_factory(SEGMENTERS, name)(**options)
    return segmenter


def load_embedder(name: str, **options: Any) -> ImageEmbedder:
    """Build image embedder ``name`` (``vae-latent``, ``dino``, ``clip`` ...)."""
    embedder: ImageEmbedder = perception_factory(EMBEDDERS, name)(**options)
    return embedder


def load_captioner(name: str, **options: Any) -> Captioner:
    """Build captioner ``name`` (``template``, ``blip2``, ``blip`` ...)."""
    captioner: Captioner = perception_factory(CAPTIONERS, name)(**options)
    return captioner


# What is configured ----------------------------------------------------------------------


def configured_segmenter() -> str | None:
    """``grounded-sam`` or ``sam`` when the environment names their weights, else None."""
    if not os.environ.get(GROUNDING_DINO_MODEL_ENV):
        return None
    if os.environ.get(SAM_MODEL_ENV):
        return "grounded-sam"
    if os.environ.get(SAM_CHECKPOINT_ENV):
        return "sam"
    return None


def configured_perception(
    backend: DenoiserBackend,
    *,
    segmenter: str | None = None,
    embedder: str | None = None,
    captioner: str | None = None,
    device: str | None = None,
) -> Perception:
    """The perception of reference-guided generation: the named models, else the configured ones.

    Unnamed, each falls back to the paper's model when its weights are configured in the
    environment (Grounded SAM, DINO, BLIP-2 or BLIP) and otherwise to the weight-free one
    of :func:`hifi.perception.builtin.default_perception` (attention, vae-latent, template).
    A backend's own preferences (:class:`~hifi.protocols.perception.PerceptionPreferences`:
    ToyWorld's models for ``toy``) come before the environment's.
    """
    preferred = dict(backend.perception_defaults) if isinstance(backend, PerceptionPreferences) else {}
    segmenter = segmenter or preferred.get("segmenter") or configured_segmenter() or "attention"
    embedder = embedder or preferred.get("embedder") or ("dino" if os.environ.get(DINO_MODEL_ENV) else "vae-latent")
    captioner = captioner or (
        "blip2" if os.environ.get(BLIP2_MODEL_ENV) else "blip" if os.environ.get(BLIP_MODEL_ENV) else "template"
    )
    options: dict[str, Any] = {"backend": backend, "device": device or str(backend.device)}
    return Perception(
        load_segmenter(segmenter, **options), load_embedder(embedder, **options), load_captioner(captioner, **options)
    )
