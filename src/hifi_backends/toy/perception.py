"""ToyWorld's perception models, in the roles the paper gives DINO, CLIP and Grounded SAM.

- ``toy-id`` (:class:`ToyIdentityEmbedder`): the identity embedder, DINO's role: trained so
  that two renders of the same object, in different scenes and poses, are close.
- ``toyclip`` (:class:`ToyClipEmbedder`): ToyCLIP's image and text towers, CLIP's role in
  the CLIP-I and CLIP-T metrics, and the zero-shot classifier that checks prompt following.
- ``toy-seg`` (:class:`ToySegmenter`): the object's mask, Grounded SAM's role in Algorithm 2.
- :class:`ToyDetailClassifier`: the object's pattern and mark and their colours, the model
  check's judge of whether a generation shows the details it was told (not a metric of the
  method's tables).

All load from the bundle (or a folder made by :mod:`hifi_backends.toy.train`) with
safetensors, and run on ``[B, 3, H, W]`` images in [-1, 1] at any size (resized to 64).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from hifi.errors import ModelNotFoundError
from hifi.perception.models import BundledModel
from hifi_backends.perception.loading import with_slots
from hifi_backends.toy.backend import BUNDLE, bundle_path
from hifi_backends.toy.models import ClipImageTower, DetailNet, IdentityNet, MaskNet

__all__ = [
    "ToyClipEmbedder",
    "ToyDetailClassifier",
    "ToyIdentityEmbedder",
    "ToySegmenter",
    "build_toy_detail",
    "build_toy_identity",
    "build_toy_segmenter",
    "build_toyclip",
    "load_toyclip",
]


def _to_unit(images: Tensor, size: int = 64) -> Tensor:
    """[-1, 1] images of any size -> [0, 1] at ``size``."""
    x = images.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def _load_small(cls: type[torch.nn.Module], folder: Path, device: str) -> Any:
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    net = cls(**config)
    net.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
    return net.eval().requires_grad_(False).to(device)


@attrs.frozen(eq=False)
class ToyIdentityEmbedder:
    net: Any
    name: str = "toy-id"

    def embed(self, images: Tensor) -> Tensor:
        device = next(self.net.parameters()).device
        with torch.no_grad():
            return self.net(_to_unit(images).to(device)).float().to(images.device)


@attrs.frozen(eq=False)
class ToySegmenter:
    net: Any
    name: str = "toy-seg"
    wants_attention: bool = False

    def segment(self, images: Tensor, class_name: str, attention: Tensor | None = None) -> Tensor:
        device = next(self.net.parameters()).device
        with torch.no_grad():
            logits = self.net(_to_unit(images).to(device))
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits[:, None], size=images.shape[-2:], mode="bilinear",
                                   align_corners=False)[:, 0]
        return (logits > 0).to(images.device)


@attrs.frozen(eq=False)
class ToyDetailClassifier:
    """``read(images)``: each image's pattern, pattern colour, mark and mark colour, by name.

    The object is found by the toy segmenter and cropped (:func:`~hifi_backends.toy.models.crop_to_object`)
    before the classifier reads it.
    """

    net: Any
    segmenter: ToySegmenter
    name: str = "toy-detail"

    def read(self, images: Tensor) -> dict[str, list[str]]:
        from hifi.toyworld.world import COLOURS, MARKS, PATTERNS
        from hifi_backends.toy.models import crop_to_object

        device = next(self.net.parameters()).device
        unit = _to_unit(images).to(device)
        masks = self.segmenter.segment(unit * 2.0 - 1.0, "object").to(device)
        with torch.no_grad():
            logits = self.net(crop_to_object(unit, masks))
        names = {"pattern": PATTERNS, "colour2": tuple(COLOURS), "mark": MARKS, "mark_colour": tuple(COLOURS)}
        return {k: [names[k][i] for i in v.argmax(dim=1).tolist()] for k, v in logits.items()}


@attrs.frozen(eq=False)
class ToyClipEmbedder:
    """ToyCLIP: ``embed(images)`` and ``embed_text(texts)`` in one space (unit norm).

    ``text_model`` is a transformers ``CLIPTextModelWithProjection``; ``image_tower`` the
    :class:`~hifi_backends.toy.models.ClipImageTower` trained against it.
    """

    text_model: Any
    image_tower: Any
    tokenizer: Any
    name: str = "toyclip"

    def embed(self, images: Tensor) -> Tensor:
        device = next(self.image_tower.parameters()).device
        with torch.no_grad():
            out = self.image_tower(_to_unit(images).to(device))
        return F.normalize(out.float(), dim=-1).to(images.device)

    def embed_text(self, texts: Sequence[str]) -> Tensor:
        device = next(self.text_model.parameters()).device
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            out = self.text_model(input_ids=ids).text_embeds
        return F.normalize(out.float(), dim=-1).cpu()


def load_toyclip(model: str | None = None, device: str | None = None) -> ToyClipEmbedder:
    """ToyCLIP from the bundle (or ``model``, a ToyWorld folder): ``toyclip/text`` and ``toyclip/image``."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = bundle_path(model)
    if not (folder / "toyclip" / "text").is_dir() or not (folder / "toyclip" / "image").is_dir():
        raise ModelNotFoundError(
            f"{folder / 'toyclip'} has no text/ and image/ folders (a ToyWorld folder from before the metric"
            f" ToyCLIP got its CNN image tower?): rebuild it with `python -m hifi_backends.toy.train --work WORK"
            f" --out {folder}`; finished stages in WORK are reused"
        )
    text = CLIPTextModelWithProjection.from_pretrained(folder / "toyclip" / "text", dtype=torch.float32)
    image = _load_small(ClipImageTower, folder / "toyclip" / "image", device or "cpu")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    return ToyClipEmbedder(text.eval().requires_grad_(False).to(device or "cpu"), image, tokenizer)


@with_slots(BundledModel("ToyCLIP text and image towers (trained)", BUNDLE))
def build_toyclip(*, model: str | None = None, device: str | None = None, backend: Any = None,
                  **_: Any) -> ToyClipEmbedder:
    """Registry entry ``toyclip`` (embedder)."""
    return load_toyclip(_toy_folder(model, backend), device)


@with_slots(BundledModel("ToyWorld identity embedder (trained)", BUNDLE))
def build_toy_identity(*, model: str | None = None, device: str | None = None, backend: Any = None,
                       **_: Any) -> ToyIdentityEmbedder:
    """Registry entry ``toy-id`` (embedder): DINO's role in ToyWorld."""
    return ToyIdentityEmbedder(_load_small(IdentityNet, bundle_path(_toy_folder(model, backend)) / "identity",
                                           device or "cpu"))


@with_slots(BundledModel("ToyWorld segmenter (trained)", BUNDLE))
def build_toy_segmenter(*, model: str | None = None, device: str | None = None, backend: Any = None,
                        **_: Any) -> ToySegmenter:
    """Registry entry ``toy-seg`` (segmenter): Grounded SAM's role in ToyWorld."""
    return ToySegmenter(_load_small(MaskNet, bundle_path(_toy_folder(model, backend)) / "segmenter",
                                    device or "cpu"))


def build_toy_detail(*, model: str | None = None, device: str | None = None) -> ToyDetailClassifier:
    """The detail classifier of the bundle (or ``model``, a ToyWorld folder)."""
    folder = bundle_path(model) / "detail"
    if not (folder / "model.safetensors").exists():
        raise ModelNotFoundError(
            f"{folder} is missing (a ToyWorld folder from before the detail classifier): train it into the work"
            " folder with `python -m hifi_backends.toy.train --work WORK --stages render,detail` and copy"
            f" WORK/detail to {folder}")
    return ToyDetailClassifier(_load_small(DetailNet, folder, device or "cpu"),
                               build_toy_segmenter(model=model, device=device))


def _toy_folder(model: str | None, backend: Any) -> str | None:
    """An explicit folder, else the folder the backend was loaded from when it is a ToyWorld one."""
    if model:
        return model
    model_id = getattr(backend, "model_id", None)
    if model_id and Path(model_id, "identity").is_dir():
        return str(model_id)
    return None
