"""Where perception weights are configured and where they are on this machine, without loading them.

The environment variables that name the model-backed perception (read by
``hifi_backends.perception``), :class:`ModelSlot` (one set of weights a factory loads: the
variable naming it and its default hub id), :class:`BundledModel` (weights that ship
inside a package, like ToyWorld's), and :func:`locate_model`, which tells a folder, a file,
a hub id in the hub cache and a missing source apart.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

__all__ = [
    "BLIP2_MODEL_ENV",
    "BLIP_MODEL_ENV",
    "CLIP_MODEL_ENV",
    "DINO_MODEL_ENV",
    "GROUNDING_DINO_MODEL_ENV",
    "RANDOM_TINY",
    "SAM_CHECKPOINT_ENV",
    "SAM_MODEL_ENV",
    "BundledModel",
    "ModelSlot",
    "locate_model",
    "looks_like_path",
]

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


@attrs.frozen
class ModelSlot:
    """One set of weights a factory loads: what it is, the variable naming it, the default hub id.

    A factory lists its slots as ``factory.model_slots`` so that
    :func:`hifi.perception.doctor.doctor_report` can say what is configured without building anything.
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


@attrs.frozen
class BundledModel:
    """Trained weights that ship inside a package, in ``folder``: nothing to configure.

    Listed in ``factory.model_slots`` beside or instead of :class:`ModelSlot` (ToyWorld's
    models); the factory's ``model`` option may still name another folder.
    """

    what: str
    folder: Path


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
