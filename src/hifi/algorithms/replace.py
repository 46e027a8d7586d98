"""Personalised subject replacement (Section 3.4, Algorithm 3) and plain word-swap editing.

Algorithm 3, with this module's names:

1. ``x_0^r`` = the photo's latent; ``c^r`` = its caption; null-text inversion
   (:func:`hifi.algorithms.null_text.null_text_inversion`) gives ``x*_T`` and phi_t*.
2. ``c^g`` = the caption with the old subject word swapped for the subject's words w_g,
   and, in ``hifi`` mode, c_s^t spliced into its last n positions (Eq. 7).
3. From ``x_T^g = x*_T`` denoise with ``[c^g, c_s^t]`` and phi_t*, every token taking the
   reconstruction's cross-attention map a_t^{r*} (through the token alignment) except
   ``[c_s^t, w_g]``, which keep their own (the modified step F~).

Step 3 runs the reconstruction and the edit as one batch and injects a_t^{r*} on the fly
(see :mod:`hifi.algorithms.prompt_to_prompt` for why). :func:`edit_image` without a subject is
null-text inversion with prompt-to-prompt word-swap editing.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hifi.algorithms.attention import AttentionController, controlled_attention
from hifi.algorithms.null_text import NullTextConfig, NullTextInversion, null_text_inversion, null_text_sample
from hifi.algorithms.prompt_to_prompt import AttentionMean, AttentionReplace, chain
from hifi.algorithms.sampling import StepCallback
from hifi.algorithms.subject import SUBJECT_SLOT, Subject, content_tokens
from hifi.errors import HifiError
from hifi.execution.edge import StepFactory, adam_steps
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import DdimGrid
from hifi.kernels.token_align import align_tokens, swap_word
from hifi.protocols.denoiser import DenoiserBackend, Model

__all__ = ["Edit", "edit_image", "prompt_to_prompt", "replace_subject", "swap_caption_word"]


@attrs.frozen(eq=False)
class Edit:
    """An edited photo and how it was made.

    Attributes:
        image, reconstruction: ``[3, H, W]`` in [-1, 1]: the edit x_0^g and the null-text
            reconstruction x_0^r, decoded.
        latents, reconstruction_latents: ``[1, C, h, w]``, the same before decoding.
        caption, edited_caption: the source caption c^r and the edited one, as encoded.
        index: ``[L]`` the source token of each edited token (-1: none).
        own: ``[L]`` bool, the subject tokens ``[c_s^t, w_g]`` (the new words, and c_s in
            ``hifi`` mode), which kept their own maps; so did the few padding positions
            that have no source (``index`` -1).
        attention: ``[2, h, w, L]`` mean cross-attention maps of the reconstruction and
            the edit, when asked for.
        inversion: the null-text inversion of the photo.
    """

    image: Tensor
    reconstruction: Tensor
    latents: Tensor
    reconstruction_latents: Tensor
    caption: str
    edited_caption: str
    index: Tensor
    own: Tensor
    attention: Tensor | None
    inversion: NullTextInversion


def _attention_rows(guidance: float) -> tuple[int, int]:
    """Rows of the reconstruction and the edit in the batch :func:`guided_output` builds.

    With guidance the batch is ``[phi, phi, c^r, c^g]``; at w = 1 only ``[c^r, c^g]`` runs.
    """
    return (0, 1) if guidance == 1.0 else (2, 3)


def prompt_to_prompt(
    backend: DenoiserBackend,
    inversion: NullTextInversion,
    edit_cond: Condition | Sequence[Condition],
    index: Tensor,
    own: Tensor,
    *,
    observer: AttentionController | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """The last loop of Algorithm 3: ``(x_0^r, x_0^g)``, each ``[1, C, h, w]``.

    ``edit_cond`` is c^g for every step, or ``[c^g, c_s^t]`` per step; ``index`` and
    ``own`` say where each edited token's map comes from (:func:`inject_maps`).
    ``observer`` sees the cross-attention maps after the injection; ``callback`` runs
    after each step (to set an :class:`AttentionStore`'s step). No gradients; the
    backend's attention processors are restored afterwards, also after an error.
    """
    steps = inversion.num_steps
    edit_conds = [edit_cond] * steps if isinstance(edit_cond, Condition) else list(edit_cond)
    conds = [Condition.cat([inversion.cond, c]) for c in edit_conds]
    source_row, target_row = _attention_rows(inversion.guidance)
    controller: AttentionController = AttentionReplace(index, own, source_row, target_row)
    if observer is not None:
        controller = chain(controller, observer)
    x_T = inversion.x_T.expand(2, -1, -1, -1)

    def step_done(i: int, t: int, x: Tensor) -> None:
        bar.update()
        if callback is not None:
            callback(i, t, x)

    with (
        torch.no_grad(),
        controlled_attention(backend, controller),
        tqdm(total=steps, desc="editing", disable=not progress, leave=False) as bar,
    ):
        x_0 = null_text_sample(
            backend.denoise, DdimGrid.build(backend.schedule, steps), x_T, conds, inversion.phis,
            guidance=inversion.guidance, callback=step_done,
        )
    return x_0[:1], x_0[1:]


def swap_caption_word(caption: str, word: str, replacement: str) -> str:
    """The caption with its first ``word`` (whole word, any case) replaced; a clear error without it."""
    try:
        return swap_word(caption, word, replacement)
    except ValueError as err:
        raise HifiError(f"the source word {word!r} is not in the caption {caption!r}") from err


def edit_image(
    backend: DenoiserBackend,
    image: Tensor,
    caption: str,
    edited_caption: str,
    *,
    subject: Subject | None = None,
    config: NullTextConfig | None = None,
    attention_maps: bool = False,
    progress: bool = False,
    model: Model | None = None,
    optimiser: StepFactory = adam_steps,
) -> Edit:
    """Null-text-invert ``image`` under ``caption``, then redraw it under ``edited_caption``.

    ``image`` is ``[3, S, S]`` (or ``[1, 3, S, S]``) in [-1, 1] at the backend's resolution.
    The edited caption's changed tokens keep their own cross-attention maps; every other
    token takes the reconstruction's (prompt-to-prompt). With a ``subject``, the edited
    caption is in the subject's wording (``<subject>`` or the class word, see
    :meth:`Subject.render_prompt`) and, in ``hifi`` mode, ``[c^g, c_s^t]`` is used per
    step with the n c_s positions keeping their own maps too (Algorithm 3). With
    ``attention_maps``, :attr:`Edit.attention` holds the mean maps of both rows. The
    null-text inversion runs ``model`` (default ``backend.denoise``) and ``optimiser``, ready
    from the edge (:mod:`hifi.execution.edge`); the prompt-to-prompt pass edits attention in
    Python, so it runs ``backend.denoise`` itself.
    """
    config = config or NullTextConfig()
    images = image.unsqueeze(0) if image.dim() == 3 else image
    grid = DdimGrid.build(backend.schedule, config.num_steps)
    with torch.no_grad():
        x_0 = backend.encode_images(images)
        cond = backend.encode_text([caption])
        if subject is None:
            edit_cond: Condition | list[Condition] = backend.encode_text([edited_caption])
        else:
            edit_cond = subject.conditions(subject.encode(backend, [edited_caption]), grid.timesteps)
            edited_caption = subject.render_prompt(edited_caption)  # the wording that was encoded
    alignment = align_tokens(
        content_tokens(backend, caption), content_tokens(backend, edited_caption), backend.max_length
    )
    index, own = alignment.index, alignment.edited.clone()
    if subject is not None and subject.mode == "hifi":
        own[-subject.num_tokens :] = True
    inversion = null_text_inversion(
        model or backend.denoise, grid, x_0, cond, backend.null_embedding(), config, optimiser=optimiser,
        progress=progress,
    )
    mean = AttentionMean(_attention_rows(config.guidance), backend.resolution // backend.vae_scale_factor)
    reconstruction, edited = prompt_to_prompt(
        backend, inversion, edit_cond, index, own, observer=mean if attention_maps else None, progress=progress
    )
    with torch.no_grad():
        decoded = backend.decode_latents(torch.cat([reconstruction, edited]))
    return Edit(
        image=decoded[1], reconstruction=decoded[0], latents=edited, reconstruction_latents=reconstruction,
        caption=caption, edited_caption=edited_caption, index=index, own=own,
        attention=mean.maps() if attention_maps else None, inversion=inversion,
    )


def replace_subject(
    backend: DenoiserBackend,
    subject: Subject,
    image: Tensor,
    caption: str,
    source_word: str,
    *,
    config: NullTextConfig | None = None,
    attention_maps: bool = False,
    progress: bool = False,
    model: Model | None = None,
    optimiser: StepFactory = adam_steps,
) -> Edit:
    """Algorithm 3: put ``subject`` where ``source_word`` of ``caption`` is in ``image``.

    ``caption`` describes the photo ("a photo of a cat on the beach"); ``source_word``
    ("cat") is swapped for the subject's words, and c_s^t is added in ``hifi`` mode.
    The keyword arguments are :func:`edit_image`'s. A clear error when the caption lacks the word.
    """
    edited = swap_caption_word(caption, source_word, SUBJECT_SLOT)
    return edit_image(
        backend, image, caption, edited, subject=subject, config=config, attention_maps=attention_maps,
        progress=progress, model=model, optimiser=optimiser,
    )
