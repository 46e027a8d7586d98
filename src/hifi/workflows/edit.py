"""Editing a photo: a word swap (``hifi edit``) or a learned subject in place of the photo's (``hifi replace``).

Both are null-text inversion then prompt-to-prompt (:mod:`hifi.algorithms.replace`;
Algorithm 3 for the subject). The photo is resized (not cropped) to the backend's square
resolution and the result back to the photo's size. With ``intermediates`` they also
write, beside ``out``: the reconstruction (``STEM.reconstruction.png``), the mean
cross-attention maps of the tokens that kept their own maps (``STEM.attention.png``), a
before / reconstruction / after strip (``STEM.before-after.png``) and a JSON summary with
the null-text losses (``STEM.json``). They never print: notes come back in the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from PIL import Image
from torch import Tensor

from hifi.algorithms.null_text import NullTextConfig
from hifi.algorithms.replace import Edit, edit_image, replace_subject, swap_caption_word
from hifi.algorithms.subject import SUBJECT_SLOT
from hifi.execution.edge import execution_for
from hifi.io.images import (
    check_writable,
    image_to_tensor,
    load_image,
    make_grid,
    save_image,
    tensor_to_image,
    write_json,
)
from hifi.io.runs import Run, apply_run
from hifi.perception.builtin import TemplateCaptioner
from hifi.protocols.denoiser import DenoiserBackend
from hifi.workflows.checks import check_finite, check_prompts_fit, check_step_count, check_subject_prompts

__all__ = ["PhotoEdit", "check_edit", "edit_photo", "replace_in_photo"]


@attrs.frozen(eq=False)
class PhotoEdit:
    """What an edit wrote (``written``, the edited photo first), notes for the user, and the edit itself."""

    out: Path
    written: tuple[Path, ...]
    notes: tuple[str, ...]
    edit: Edit


def _photo_note(path: str | Path, photo: Image.Image, resolution: int) -> str | None:
    """Why the photo is resized, when it is."""
    if photo.size == (resolution, resolution):
        return None
    w, h = photo.size
    return f"{path} is {w}x{h}: edited at {resolution}x{resolution} and resized back to {w}x{h}"


def _to_backend(photo: Image.Image, resolution: int) -> Tensor:
    """The whole photo (no crop) as a square ``[3, S, S]`` tensor in [-1, 1]."""
    return image_to_tensor(photo.resize((resolution, resolution), Image.Resampling.BICUBIC), resolution)


def _write_edit(edit: Edit, photo: Image.Image, out: Path, intermediates: bool, extra: dict[str, Any]) -> list[Path]:
    """Write the edit at the photo's size, and the intermediates; return the paths written."""
    save_image(tensor_to_image(edit.image).resize(photo.size, Image.Resampling.BICUBIC), out)
    written = [out]
    if not intermediates:
        return written
    side = edit.image.shape[-1]
    stem = out.with_suffix("")
    recon = stem.with_name(f"{stem.name}.reconstruction.png")
    save_image(tensor_to_image(edit.reconstruction).resize(photo.size, Image.Resampling.BICUBIC), recon)
    strip = stem.with_name(f"{stem.name}.before-after.png")
    before = photo.resize((side, side), Image.Resampling.BICUBIC)
    save_image(make_grid([before, tensor_to_image(edit.reconstruction), tensor_to_image(edit.image)], cols=3), strip)
    written += [recon, strip]
    own = [int(i) for i in edit.own.nonzero().flatten()]
    if edit.attention is not None and own:
        maps = edit.attention[1].permute(2, 0, 1)[own]  # the edit's maps of its own tokens
        maps = maps / maps.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
        attention = stem.with_name(f"{stem.name}.attention.png")
        save_image(make_grid([tensor_to_image(m) for m in maps], cols=len(own), cell=side), attention)
        written.append(attention)
    inversion = edit.inversion
    error = float((edit.reconstruction_latents - inversion.trajectory[0]).pow(2).mean())
    summary = stem.with_name(f"{stem.name}.json")
    write_json(summary, {
        **extra,
        "caption": edit.caption,
        "edited_caption": edit.edited_caption,
        "own_token_positions": own,
        "token_alignment": [int(i) for i in edit.index],
        "null_text_losses": list(inversion.losses),
        "null_text_iterations": list(inversion.iterations),
        "reconstruction_latent_mse": error,
    })
    written.append(summary)
    return written


def check_edit(
    image: str | Path, out: str | Path, caption: str | None, source_word: str, config: NullTextConfig
) -> None:
    """What :func:`edit_photo` and :func:`replace_in_photo` refuse before a model loads: an output file
    that cannot be written, a NaN or infinite setting, a caption without ``source_word``, an
    unreadable photo. Creates nothing."""
    check_writable(out, folder=False)
    check_finite({"--guidance": config.guidance, "--lr": config.lr, "--tolerance": config.tolerance})
    if caption is not None:
        swap_caption_word(caption, source_word, SUBJECT_SLOT)
    load_image(image)


def edit_photo(
    backend: DenoiserBackend,
    image: str | Path,
    caption: str,
    source_word: str,
    target_word: str,
    out: str | Path,
    *,
    config: NullTextConfig | None = None,
    intermediates: bool = False,
    progress: bool = False,
    accel: str = "eager",
) -> PhotoEdit:
    """Swap ``source_word`` of the photo's ``caption`` for ``target_word`` and write the edited photo to ``out``.

    No subject: null-text inversion of the photo under ``caption``, then prompt-to-prompt
    under the edited caption, only the new word keeping its own cross-attention maps.
    ``accel`` is the execution mode of the inversion (:func:`hifi.execution.edge.execution_for`).
    """
    config = config or NullTextConfig()
    check_edit(image, out, caption, source_word, config)
    edited = swap_caption_word(caption, source_word, target_word)
    photo = load_image(image)
    check_step_count(config.num_steps, backend.schedule.num_train_timesteps, "--ddim-steps")
    check_prompts_fit(backend, [caption, edited], flag="--caption")
    execution = execution_for(backend, accel)
    edit = edit_image(
        backend, _to_backend(photo, backend.resolution), caption, edited, config=config,
        attention_maps=intermediates, progress=progress, model=execution.model(backend.denoise),
        optimiser=execution.runner,
    )
    extra = {"image": str(image), "backend": backend.name, "null_text_config": attrs.asdict(config)}
    written = _write_edit(edit, photo, Path(out), intermediates, extra)
    note = _photo_note(image, photo, backend.resolution)
    return PhotoEdit(out=Path(out), written=tuple(written), notes=(note,) if note else (), edit=edit)


def replace_in_photo(
    backend: DenoiserBackend,
    run: Run,
    image: str | Path,
    source_word: str,
    out: str | Path,
    *,
    caption: str | None = None,
    config: NullTextConfig | None = None,
    intermediates: bool = False,
    progress: bool = False,
    accel: str = "eager",
) -> PhotoEdit:
    """Algorithm 3: put the run's subject where ``source_word`` of ``caption`` is in the photo; write it to ``out``.

    Without ``caption`` the template captioner's "a photo of a SOURCE_WORD" describes the
    photo (said in the notes). ``accel`` is the execution mode of the inversion.
    """
    config = config or NullTextConfig()
    check_edit(image, out, caption, source_word, config)
    photo = load_image(image)
    check_step_count(config.num_steps, backend.schedule.num_train_timesteps, "--ddim-steps")
    execution = execution_for(backend, accel)
    subject = apply_run(run, backend)
    notes = [note for note in (_photo_note(image, photo, backend.resolution),) if note]
    tensor = _to_backend(photo, backend.resolution)
    if not caption:
        captioner = TemplateCaptioner()
        caption = captioner.caption(tensor.unsqueeze(0), source_word)[0]
        notes.append(f"no --caption: the {captioner.name} captioner says {caption!r}")
    check_prompts_fit(backend, [caption], flag="--caption")
    check_subject_prompts(backend, subject, [swap_caption_word(caption, source_word, SUBJECT_SLOT)],
                          flag=f"--caption with the subject for {source_word!r},")
    edit = replace_subject(
        backend, subject, tensor, caption, source_word, config=config, attention_maps=intermediates,
        progress=progress, model=execution.model(backend.denoise), optimiser=execution.runner,
    )
    extra = {
        "image": str(image), "run": str(run.path), "mode": subject.mode, "backend": backend.name,
        "source_word": source_word, "null_text_config": attrs.asdict(config),
    }
    written = _write_edit(edit, photo, Path(out), intermediates, extra)
    return PhotoEdit(out=Path(out), written=tuple(written), notes=tuple(notes), edit=edit)
