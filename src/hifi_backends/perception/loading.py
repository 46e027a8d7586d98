"""Where perception weights come from: a local folder, a checkpoint file, a hub id, or ``random:tiny``.

Every perception model resolves its source the same way (:func:`resolve`: the ``model``
option, else its environment variable, else its default hub id) and loads it the same way
(:func:`load_pretrained`), so that every failure reads alike: one line, naming what was
looked for and the variable to set. The hub is asked only when ``HF_HUB_OFFLINE`` is unset;
a local folder never touches it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import torch

from hifi.errors import HifiError, ModelNotFoundError
from hifi.perception.models import RANDOM_TINY, BundledModel, ModelSlot, looks_like_path
from hifi.registry import check_device, default_device
from hifi_backends.perception.pixels import PixelConfig

__all__ = [
    "first_line",
    "hub_offline",
    "is_random",
    "load_pretrained",
    "load_state_dict",
    "load_tokenizer",
    "missing_model",
    "pick_device",
    "pick_dtype",
    "place",
    "read_pixel_config",
    "resolve",
    "with_slots",
]

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=torch.nn.Module)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def with_slots(*slots: ModelSlot | BundledModel) -> Callable[[F], F]:
    """Declare the weights a factory loads (``factory.model_slots``, read by ``hifi doctor``)."""

    def mark(factory: F) -> F:
        factory.model_slots = slots  # type: ignore[attr-defined]
        return factory

    return mark


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def missing_model(slot: ModelSlot, source: str, reason: str) -> ModelNotFoundError:
    """The one line for weights that are not here: what, where, why, and the variable to set."""
    return ModelNotFoundError(
        f"could not load {slot.what} from {source!r} ({reason}): set {slot.env} to a local folder,"
        " a checkpoint file or a hub id that is in the hub cache (this machine may have no hub access)"
    )


def resolve(slot: ModelSlot, model: str | None) -> str:
    """The source in force for ``slot``: the option, else ``$slot.env``, else the default hub id."""
    source, _ = slot.configured(model)
    if not source:
        raise ModelNotFoundError(
            f"no {slot.what} weights configured: set {slot.env} to a local folder, a checkpoint file or a hub id"
        )
    return source


def is_random(source: str) -> bool:
    """True for ``random:tiny``; any other ``random:`` value is a mistake."""
    if not source.startswith("random:"):
        return False
    if source != RANDOM_TINY:
        raise HifiError(f"unknown random model {source!r}: the only one is {RANDOM_TINY!r}")
    return True


def pick_device(device: str | None) -> torch.device:
    """``device`` (a clear error if it is not on this machine), or CUDA when present."""
    if device is not None:
        check_device(device)
    return torch.device(device or default_device())


def pick_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise HifiError(f"unknown dtype {dtype!r}; choose from {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def place(model: M, device: torch.device, dtype: torch.dtype = torch.float32) -> M:
    """Inference mode on ``device``: eval, no gradients, ``dtype``."""
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or PyTorch checkpoint (unwrapping ``{"model": ...}``/``{"state_dict": ...}``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise HifiError(f"{path} holds no state dict")
    return dict(state)


def _local(source: str) -> Path | None:
    """The folder of a local source (a checkpoint file's own folder), None for a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    return None


def _check_exists(slot: ModelSlot, source: str) -> None:
    if looks_like_path(source) and _local(source) is None:
        raise missing_model(slot, source, "no such file or folder")


def load_pretrained(cls: Any, slot: ModelSlot, source: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` on a folder or hub id; a checkpoint file loads into ``cls(config beside it)``."""
    _check_exists(slot, source)
    path = Path(source).expanduser()
    try:
        if path.is_file():
            # from_pretrained rather than load_state_dict: it renames the keys of older checkpoints
            config = cls.config_class.from_pretrained(str(path.parent), local_files_only=True)
            return cls.from_pretrained(None, config=config, state_dict=load_state_dict(path), **kwargs)
        folder = _local(source)
        return cls.from_pretrained(
            str(folder) if folder else source, local_files_only=folder is not None or hub_offline(), **kwargs
        )
    except (OSError, ValueError) as err:
        raise missing_model(slot, source, first_line(err)) from err
    except RuntimeError as err:  # load_state_dict: keys or shapes of another architecture
        raise HifiError(f"{source} does not fit {slot.what}: {' '.join(str(err).split())[:300]}") from err


def load_tokenizer(slot: ModelSlot, source: str) -> Any:
    """The tokenizer saved with the model (in its folder, a checkpoint file's folder, or the hub id)."""
    from transformers import AutoTokenizer

    _check_exists(slot, source)
    folder = _local(source)
    try:
        return AutoTokenizer.from_pretrained(
            str(folder) if folder else source, local_files_only=folder is not None or hub_offline()
        )
    except (OSError, ValueError) as err:
        raise missing_model(slot, f"{source} (tokenizer)", first_line(err)) from err


def _preprocessor_file(source: str) -> Path | None:
    folder = _local(source)
    if folder is not None:
        path = folder / "preprocessor_config.json"
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "preprocessor_config.json")
    except Exception:  # not a valid repo id: no cached processor
        return None
    return Path(cached) if isinstance(cached, str) else None


def _side(size: Any, *keys: str) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, Mapping):
        for key in keys:
            if isinstance(size.get(key), int):
                return int(size[key])
    return None


def read_pixel_config(source: str, default: PixelConfig, side: int | None = None) -> PixelConfig:
    """The mean, std, size and crop of the model's image processor, read from its
    ``preprocessor_config.json`` (in the folder or the hub cache); ``default`` where absent.

    ``side`` is the model's input side (its config's ``image_size``): the final size is
    always that, whatever a processor file says or lacks.
    """
    config = _read_pixel_config(source, default)
    if side is None:
        return config
    if config.crop is None:
        return attrs.evolve(config, resize=side)
    return attrs.evolve(config, crop=side, resize=max(side, config.resize * side // config.crop))


def load_image_text_model(slot: ModelSlot, model_class: Any, model: str | None,
                          tiny: Callable[[], tuple[Any, Any, PixelConfig]],
                          default_pixels: PixelConfig) -> tuple[Any, Any, PixelConfig]:
    """An image-and-text model (CLIP, BLIP), its tokenizer and its pixel config.

    ``model`` (or the slot's variable, or its default) resolved: ``tiny()`` for the random tiny
    one, else the weights, the tokenizer and the processor's pixel config (``default_pixels``
    where the folder has none), sized to the vision tower's ``image_size``.
    """
    source = resolve(slot, model)
    if is_random(source):
        return tiny()
    net = load_pretrained(model_class, slot, source)
    pixels = read_pixel_config(source, default_pixels, net.config.vision_config.image_size)
    return net, load_tokenizer(slot, source), pixels


def _read_pixel_config(source: str, default: PixelConfig) -> PixelConfig:
    path = _preprocessor_file(source)
    if path is None:
        return default
    raw = json.loads(path.read_text())
    mean = tuple(raw.get("image_mean", default.mean))
    std = tuple(raw.get("image_std", default.std))
    size = raw.get("size")
    crop = _side(raw.get("crop_size"), "height", "shortest_edge") if raw.get("do_center_crop") else None
    resize = _side(size, "shortest_edge", "height") or default.resize
    mode = {2: "bilinear", 3: "bicubic"}.get(raw.get("resample"), default.mode)
    return PixelConfig(resize=resize, mean=mean, std=std, crop=crop, mode=mode)
