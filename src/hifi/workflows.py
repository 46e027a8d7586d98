"""File-level workflows: a folder of photos in, a run folder out.

These join the I/O edge (:mod:`hifi.io`, :mod:`hifi.runs`) to the algorithms; the command
line is a thin layer over them, and an embedding product can call them directly. They
never print: warnings come back in the result, progress goes to an optional tqdm bar.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import attrs
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from hifi.algorithms.generate import generate
from hifi.algorithms.reference import References, prepare_references
from hifi.algorithms.tune import TuneConfig, caption_for, tune
from hifi.errors import HifiError
from hifi.fastpath import check_accel
from hifi.io import image_to_tensor, list_images, load_image, make_grid, mask_to_tensor, save_image, tensor_to_image
from hifi.perception import ImageEmbedder
from hifi.protocols import DenoiserBackend
from hifi.runs import FolderCheckpointer, Run, RunMeta, save_run, write_jsonl

__all__ = ["SubjectPhotos", "TuneOutcome", "load_references", "load_subject_photos", "tune_to_run"]

MaskSource = Literal["none", "folder", "auto"]


@attrs.frozen(eq=False)
class SubjectPhotos:
    """Source photos and masks, square at the backend's resolution."""

    names: tuple[str, ...]
    images: Tensor
    """``[B, 3, S, S]`` in [-1, 1]."""
    masks: Tensor
    """``[B, S, S]`` in {0, 1}."""
    mask_source: MaskSource
    warnings: tuple[str, ...] = ()


def load_subject_photos(
    subject_dir: str | Path, size: int, masks: str | Path | None = None, class_name: str | None = None
) -> SubjectPhotos:
    """Read 3-6 photos of any size, mode and orientation, and their masks.

    ``masks`` is a folder holding a mask per photo under the same file stem (any image
    format; non-black pixels are the subject), ``"auto"`` for a segmenter's masks of
    ``class_name`` (Grounded SAM, see :func:`hifi.perception_registry.auto_masks`), or
    ``"none"``/None for all-ones masks. Clear
    errors for a missing or empty folder, unreadable files, unmatched masks, empty masks.
    """
    files = list_images(subject_dir)
    warnings: list[str] = []
    if not 3 <= len(files) <= 6:
        warnings.append(f"{len(files)} photos in {subject_dir}; the method is meant for 3 to 6")
    photos = [load_image(f) for f in files]
    images = torch.stack([image_to_tensor(p, size) for p in photos])
    names = tuple(f.stem for f in files)
    if masks is None or str(masks) == "none":
        return SubjectPhotos(names, images, torch.ones(len(files), size, size), "none", tuple(warnings))
    if str(masks) == "auto":
        from hifi.perception_registry import auto_masks

        found = auto_masks(images, class_name or "")
        empty = [n for n, m in zip(names, found, strict=True) if not m.any()]
        if empty:
            warnings.append(f"no {class_name} found in {', '.join(empty)}: the whole photo is its mask")
        found[found.flatten(1).sum(1) == 0] = 1.0
        return SubjectPhotos(names, images, found, "auto", tuple(warnings))
    mask_files = {f.stem: f for f in list_images(masks)}
    missing = [n for n in names if n not in mask_files]
    extra = sorted(set(mask_files) - set(names))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no mask for {', '.join(missing)}")
        if extra:
            parts.append(f"masks without a photo: {', '.join(extra)}")
        raise HifiError(f"photos and masks do not match ({'; '.join(parts)}) in {masks}")
    mask_list = []
    for name, photo in zip(names, photos, strict=True):
        img = load_image(mask_files[name], mode="L")
        if img.size != photo.size:
            warnings.append(f"mask {mask_files[name].name} is {img.size[0]}x{img.size[1]}, its photo"
                            f" {photo.size[0]}x{photo.size[1]}: resized")
            img = img.resize(photo.size, Image.Resampling.NEAREST)
        m = mask_to_tensor(img, size)
        if m.sum() == 0:
            raise HifiError(f"mask {mask_files[name]} is empty: it marks no subject pixel")
        mask_list.append(m)
    return SubjectPhotos(names, images, torch.stack(mask_list), "folder", tuple(warnings))


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise HifiError(f"cannot write to {folder}: {err.strerror or err}") from err


@attrs.frozen
class TuneOutcome:
    run_dir: Path
    warnings: tuple[str, ...]
    final_loss: float | None


def tune_to_run(
    backend: DenoiserBackend,
    subject_dir: str | Path,
    class_name: str,
    out: str | Path,
    *,
    config: TuneConfig | None = None,
    masks: str | Path | None = None,
    resume: bool = False,
    samples: int = 2,
    progress: bool = False,
) -> TuneOutcome:
    """Tune on a folder of photos and write a run folder (see :mod:`hifi.runs`).

    With ``resume`` an interrupted tune in ``out`` continues from its last checkpoint
    (the result equals an uninterrupted run's on the CPU); without it, a folder that
    already holds a run or a checkpoint is refused.
    """
    config = config or TuneConfig()
    run_dir = Path(out)
    if not class_name.strip():
        raise HifiError("--class-name must not be empty")
    check_accel(config.accel, backend.device)  # before anything is written
    checkpointer = FolderCheckpointer(run_dir / "checkpoint")
    if not resume and ((run_dir / "run.json").exists() or checkpointer.index.exists()):
        raise HifiError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    if resume and (run_dir / "run.json").exists() and not checkpointer.index.exists():
        raise HifiError(f"{run_dir} holds a finished run: nothing to resume")
    _check_writable(run_dir)
    photos = load_subject_photos(subject_dir, backend.resolution, masks, class_name=class_name)
    total = config.total_steps + (config.stepwise_steps * config.num_steps if config.mode == "hifi" else 0)
    bar = tqdm(total=total, desc=f"tune {config.mode}", disable=not progress, unit="step", dynamic_ncols=True)

    def on_step(stage: str, step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(stage=stage, loss=f"{loss:.4f}")

    resumed_state = checkpointer.load() if resume else None
    if resumed_state is not None:
        bar.update(len(resumed_state.get("losses", [])))
    try:
        result = tune(
            backend, photos.images, class_name,
            masks=photos.masks if config.use_mask else None, config=config,
            checkpointer=checkpointer, on_step=on_step,
        )
    finally:
        bar.close()
    for folder, tensors, names in (("sources", photos.images, photos.names), ("masks", photos.masks, photos.names)):
        for name, t in zip(names, tensors, strict=True):
            save_image(tensor_to_image(t), run_dir / folder / f"{name}.png")
    meta = RunMeta(
        backend=backend.name, model_id=backend.model_id, mode=config.mode, class_name=class_name,
        caption=result.caption, num_tokens=result.subject.num_tokens, text_width=backend.text_width,
        max_length=backend.max_length, schedule=backend.schedule.to_config(), num_steps=config.num_steps,
        sources=photos.names, masks=photos.mask_source if config.use_mask else "none", config=config.resolved(),
    )
    write_jsonl(run_dir / "losses.jsonl", result.losses)
    if samples > 0:
        gen = generate(backend, result.subject, caption_for("hifi", class_name), list(range(samples)),
                       num_steps=config.num_steps)
        images = [tensor_to_image(x) for x in gen.images]
        for seed, im in zip(gen.seeds, images, strict=True):
            save_image(im, run_dir / "samples" / f"seed{seed}.png")
        save_image(make_grid(images, cols=len(images)), run_dir / "samples" / "grid.png")
    save_run(run_dir, result.subject, meta, denoiser_state=result.denoiser_state)
    checkpointer.clear()
    final = result.losses[-1]["loss"] if result.losses else None
    return TuneOutcome(run_dir=run_dir, warnings=photos.warnings, final_loss=final)


def load_references(run: Run, size: int, embedder: ImageEmbedder) -> tuple[References, list[str]]:
    """The run's source photos and the masks it was tuned with; a missing or empty mask is the whole photo."""
    sources = run.source_images()
    if not sources:
        raise HifiError(f"{run.path} has no source photos (sources/*.png) to take a reference from; use --no-reference")
    masks = {p.stem: p for p in run.mask_images()}
    warnings = []
    images, mask_list = [], []
    for path in sources:
        images.append(image_to_tensor(load_image(path), size))
        mask = mask_to_tensor(load_image(masks[path.stem], "L"), size) if path.stem in masks else None
        if mask is None or not bool(mask.any()):
            warnings.append(f"{path.name} has no subject mask in {run.path / 'masks'}; the whole photo is its subject")
            mask = torch.ones(size, size)
        mask_list.append(mask)
    refs = prepare_references(torch.stack(images), torch.stack(mask_list) > 0.5, [p.stem for p in sources], embedder)
    return refs, warnings
