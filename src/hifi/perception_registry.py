"""Perception models by name: segmenters, image embedders and captioners (Section 3.3).

The protocols live in :mod:`hifi.perception`; this module finds implementations, as
:mod:`hifi.registry` finds denoiser backends. The weight-free ones are built in:

- segmenters ``attention`` (cross-attention maps of the generation, the default) and
  ``folder`` (masks from a folder, option ``folder``);
- embedder ``vae-latent`` (option ``backend``); captioner ``template``.

Model-backed ones live in ``hifi_backends.perception`` and announce themselves through
the entry-point groups ``hifi.segmenters``, ``hifi.embedders`` and ``hifi.captioners``:
``grounded-sam``, ``sam``, ``dino``, ``clip``, ``blip2``, ``blip``. Every factory takes
the options ``model`` (a local folder, a checkpoint file, a hub id, or ``random:tiny``
for a random tiny model built from a config), ``device`` and ``backend``, plus its own.
Without ``model`` a factory reads the environment variable of its slot (below), then its
default hub id. Missing weights raise :class:`~hifi.errors.ModelNotFoundError` in one line
that names the variable to set.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from hifi.errors import HifiError
from hifi.io.images import list_images, load_image, mask_to_tensor
from hifi.perception import (
    AttentionSegmenter,
    Captioner,
    ImageEmbedder,
    Perception,
    Segmenter,
    TemplateCaptioner,
    VaeLatentEmbedder,
)
from hifi.protocols.denoiser import DenoiserBackend
from hifi.registry import available_backends

__all__ = [
    "BLIP2_MODEL_ENV",
    "BLIP_MODEL_ENV",
    "CAPTIONERS",
    "CLIP_MODEL_ENV",
    "DINO_MODEL_ENV",
    "GROUNDING_DINO_MODEL_ENV",
    "RANDOM_TINY",
    "SAM_CHECKPOINT_ENV",
    "SAM_MODEL_ENV",
    "EMBEDDERS",
    "FolderSegmenter",
    "ModelSlot",
    "SEGMENTERS",
    "auto_masks",
    "available_perception",
    "configured_segmenter",
    "configured_perception",
    "cosine_similarity_matrix",
    "default_device",
    "doctor_report",
    "load_captioner",
    "load_embedder",
    "load_segmenter",
    "locate_model",
    "looks_like_path",
    "register_captioner",
    "register_embedder",
    "register_segmenter",
    "runtime_versions",
]

SEGMENTERS, EMBEDDERS, CAPTIONERS = "segmenters", "embedders", "captioners"
_KINDS = (SEGMENTERS, EMBEDDERS, CAPTIONERS)

# The variables that configure the model-backed perception (read by hifi_backends.perception).
SAM_MODEL_ENV = "HIFI_SAM_MODEL"
SAM_CHECKPOINT_ENV = "HIFI_SAM_CHECKPOINT"
GROUNDING_DINO_MODEL_ENV = "HIFI_GROUNDING_DINO_MODEL"
DINO_MODEL_ENV = "HIFI_DINO_MODEL"
CLIP_MODEL_ENV = "HIFI_CLIP_MODEL"
BLIP2_MODEL_ENV = "HIFI_BLIP2_MODEL"
BLIP_MODEL_ENV = "HIFI_BLIP_MODEL"

RANDOM_TINY = "random:tiny"
"""The ``model`` value that builds a random tiny model from a config (tests, CI)."""

Factory = Callable[..., Any]


@attrs.frozen
class ModelSlot:
    """One set of weights a factory loads: what it is, the variable naming it, the default hub id.

    A factory lists its slots as ``factory.model_slots`` so that :func:`doctor_report` can
    say what is configured without building anything.
    """

    what: str
    env: str
    default: str | None = None

    def configured(self, model: str | None = None) -> tuple[str | None, str]:
        """The source in force and where it came from: ``option``, ``$ENV`` or ``default``."""
        if model:
            return model, "option"
        if os.environ.get(self.env):
            return os.environ[self.env], f"${self.env}"
        return self.default, "default"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# Built-in, weight-free -------------------------------------------------------------------


def _no_model(name: str, model: str | None) -> None:
    if model:
        raise HifiError(f"the {name} perception model has no weights and loads no model; drop model={model!r}")


@attrs.frozen
class FolderSegmenter:
    """Masks read from a folder instead of computed: one mask image per photo, same file stem.

    ``names`` picks the masks (in order) for the images of each :meth:`segment` call;
    without it every mask in the folder is used, sorted by file name. Any non-black
    pixel is subject; masks are resized (nearest) to the images.
    """

    folder: Path
    names: tuple[str, ...] | None = None
    name: str = "folder"
    wants_attention: bool = False

    def segment(self, images: Tensor, class_name: str, attention: Tensor | None = None) -> Tensor:
        files = {f.stem: f for f in list_images(self.folder)}
        names = self.names if self.names is not None else tuple(sorted(files))
        missing = [n for n in names if n not in files]
        if missing:
            raise HifiError(f"no mask for {', '.join(missing)} in {self.folder}")
        if len(names) != images.shape[0]:
            raise HifiError(f"{len(names)} masks in {self.folder} for {images.shape[0]} images")
        h, w = images.shape[-2:]
        masks = torch.stack([mask_to_tensor(load_image(files[n], "L"), max(h, w)) for n in names])
        masks = F.interpolate(masks[:, None], size=(h, w), mode="nearest")[:, 0]
        return (masks > 0.5).to(images.device)


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


def _factory(kind: str, name: str) -> Factory:
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
    segmenter: Segmenter = _factory(SEGMENTERS, name)(**options)
    return segmenter


def load_embedder(name: str, **options: Any) -> ImageEmbedder:
    """Build image embedder ``name`` (``vae-latent``, ``dino``, ``clip`` ...)."""
    embedder: ImageEmbedder = _factory(EMBEDDERS, name)(**options)
    return embedder


def load_captioner(name: str, **options: Any) -> Captioner:
    """Build captioner ``name`` (``template``, ``blip2``, ``blip`` ...)."""
    captioner: Captioner = _factory(CAPTIONERS, name)(**options)
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
    of :func:`hifi.perception.default_perception` (attention, vae-latent, template).
    A backend's own ``perception_defaults`` (ToyWorld's models for ``toy``) come before the
    environment's.
    """
    preferred = dict(getattr(backend, "perception_defaults", {}) or {})
    segmenter = segmenter or preferred.get("segmenter") or configured_segmenter() or "attention"
    embedder = embedder or preferred.get("embedder") or ("dino" if os.environ.get(DINO_MODEL_ENV) else "vae-latent")
    captioner = captioner or (
        "blip2" if os.environ.get(BLIP2_MODEL_ENV) else "blip" if os.environ.get(BLIP_MODEL_ENV) else "template"
    )
    options: dict[str, Any] = {"backend": backend, "device": device or str(backend.device)}
    return Perception(
        load_segmenter(segmenter, **options), load_embedder(embedder, **options), load_captioner(captioner, **options)
    )


def auto_masks(images: Tensor, class_name: str, segmenter_name: str | None = None, **options: Any) -> Tensor:
    """Subject masks ``[B, H, W]`` in {0, 1} for source photos ``[B, 3, H, W]`` in [-1, 1] (``--masks auto``).

    Uses ``segmenter_name`` or else Grounded SAM when its weights are configured
    (``HIFI_GROUNDING_DINO_MODEL`` with ``HIFI_SAM_MODEL`` or ``HIFI_SAM_CHECKPOINT``).
    A photo where the subject is not found gets an all-zero mask: the caller decides.
    """
    name = segmenter_name or configured_segmenter()
    if name is None:
        raise HifiError(
            f"--masks auto needs Grounded SAM: set {GROUNDING_DINO_MODEL_ENV} (a Grounding DINO folder or hub id)"
            f" and {SAM_MODEL_ENV} (a SAM folder or hub id) or {SAM_CHECKPOINT_ENV} (a segment-anything .pth);"
            " or pass --masks DIR or --masks none"
        )
    segmenter = load_segmenter(name, **options)
    if segmenter.wants_attention:
        raise HifiError(f"the {name} segmenter reads the attention of a generation; photos need another segmenter")
    with torch.no_grad():
        return segmenter.segment(images, class_name).float()


# Helpers ---------------------------------------------------------------------------------


def cosine_similarity_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarities ``[N, M]`` of rows ``a`` ``[N, D]`` and ``b`` ``[M, D]`` (float32).

    Rows are L2-normalised, then ``a @ b.T``: the DINO and CLIP-I scores are means of it,
    CLIP-T its diagonal over image-prompt pairs.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise HifiError(f"cosine similarity needs [N, D] and [M, D] embeddings, got {tuple(a.shape)}, {tuple(b.shape)}")
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float().to(a.device), dim=-1).T


_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def looks_like_path(source: str) -> bool:
    """A file or folder path rather than a hub id (``org/name``) or ``random:...``."""
    return (
        source.startswith((".", "/", "~")) or source.count("/") > 1
        or Path(source).suffix in _WEIGHT_SUFFIXES or Path(source).exists()
    )


def locate_model(source: str | None) -> str:
    """Where ``source`` is on this machine, without loading or downloading anything.

    ``random`` (built from a config), ``folder``, ``file``, ``hub cache`` (a hub id with a
    cached snapshot), or a few words saying what is missing.
    """
    if not source:
        return "-"
    if source.startswith("random:"):
        return "random"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    if looks_like_path(source):
        return "missing: no such file or folder"
    try:
        from huggingface_hub import scan_cache_dir

        cached = {repo.repo_id for repo in scan_cache_dir().repos}
    except Exception:  # no cache folder yet, or an unreadable one: nothing is cached
        cached = set()
    return "hub cache" if source in cached else "missing: not in the hub cache"


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


_SD_BACKENDS = ("sd14", "sd14-fp16")
"""Backends that read their weights from HIFI_SD_MODEL (see hifi_backends.stable_diffusion)."""


def _backend_slots(name: str, factory: Factory | None) -> tuple[ModelSlot, ...]:
    slots: tuple[ModelSlot, ...] = getattr(factory, "model_slots", ())
    if not slots and name in _SD_BACKENDS:
        return (ModelSlot("Stable Diffusion", "HIFI_SD_MODEL"),)
    return slots


def doctor_report() -> list[dict[str, str]]:
    """One row per perception model and backend: what is configured, whether it is here, the device.

    Keys: ``kind``, ``name``, ``what``, ``model`` (the source in force), ``configured``
    (``$ENV``, ``default``, ``not configured: set $ENV`` or ``nothing to configure``), ``found`` (:func:`locate_model`),
    ``device``. Builds nothing; a factory that cannot even be imported gets a row saying why.
    """
    device = default_device()
    rows: list[dict[str, str]] = []

    def add(kind: str, name: str, slots: Sequence[ModelSlot], without: str = "no weights") -> None:
        if not slots:
            rows.append({"kind": kind, "name": name, "what": without, "model": "-",
                         "configured": "nothing to configure", "found": "built in", "device": device})
        for slot in slots:
            source, origin = slot.configured()
            rows.append({"kind": kind, "name": name, "what": slot.what, "model": source or "-",
                         "configured": origin if source else f"not configured: set ${slot.env}",
                         "found": locate_model(source), "device": device})

    for kind in _KINDS:
        for name in _available(kind):
            try:
                factory = _factory(kind, name)
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
