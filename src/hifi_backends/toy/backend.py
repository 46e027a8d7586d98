"""The ``toy`` backend: ToyWorld's bundled diffusion model, loaded like Stable Diffusion.

The bundle is a diffusers folder inside this package (see :mod:`hifi_backends.toy.train`
for how it was made); ``--backend toy`` is the generic Stable Diffusion loader pointed at
it, so the toy model exercises exactly the code path that real weights take.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import attrs

from hifi.errors import ModelNotFoundError
from hifi.perception.models import BundledModel
from hifi_backends.diffusers_backend import DiffusersBackend

BUNDLE = Path(__file__).resolve().parent / "bundle"
"""The bundled ToyWorld model folder."""

PERCEPTION: Mapping[str, str] = MappingProxyType({"segmenter": "toy-seg", "embedder": "toy-id", "clip": "toyclip"})
"""ToyWorld's perception models in the roles of Grounded SAM, DINO and CLIP."""


def bundle_path(model: str | None = None) -> Path:
    """The ToyWorld folder to load: ``model`` if given, else the bundled one."""
    folder = Path(model).expanduser() if model else BUNDLE
    if not (folder / "unet").is_dir():
        raise ModelNotFoundError(
            f"no ToyWorld model in {folder}: rebuild it with `python -m hifi_backends.toy.train"
            f" --out {folder}` (about 90 minutes on 2 CPU cores)"
        )
    return folder


@attrs.frozen
class ToyBackendFactory:
    """Registry entry ``toy`` (:data:`build_toy_backend`): builds the backend, and says without building it
    which perception models suit it (:class:`~hifi.protocols.perception.PerceptionPreferences`) and
    which weights it loads (``model_slots``, read by ``hifi doctor``)."""

    perception_defaults: Mapping[str, str] = PERCEPTION
    model_slots: tuple[BundledModel, ...] = (BundledModel("ToyWorld diffusion model (trained)", BUNDLE),)

    def __call__(self, *, model: str | None = None, seed: int = 0, device: str | None = None) -> DiffusersBackend:
        """The bundled ToyWorld model (or ``model``, a folder made by the same script)."""
        from hifi_backends.stable_diffusion import load_stable_diffusion

        folder = bundle_path(model)
        del seed  # trained weights: nothing random to seed
        backend = load_stable_diffusion(str(folder), name="toy", device=device or "cpu")
        backend.perception_defaults = dict(self.perception_defaults)
        return backend


build_toy_backend = ToyBackendFactory()
"""Registry entry ``toy``: the bundled ToyWorld model (or ``model``, a folder made by the same script)."""
