"""Reference-guided generation (Section 3.3, Algorithm 2, Eq. 8-10), one function per stage.

Per generated image (:func:`reference_guided_generate` runs them all):

1. :func:`first_pass`: x_T from the seed and I_g1 by Eq. 7, recording the subject tokens'
   cross-attention for the segmenter. It *is* the plain generation of
   :func:`hifi.algorithms.generate.generate`, bit for bit.
2. :func:`latent_mask`: the segmenter's M_g of I_g1, resized to the latent grid.
3. :func:`choose_reference`: I_r, the source photo of highest embedding cosine to I_g1.
4. :func:`align_reference`: T_theta fitted from M_r onto M_g (Eq. 8, 9, Algorithm 4);
   I_r and M_r warped by it, M_r* = T_theta(M_r).
5. :func:`invert_reference`: the caption c_r, x*_0 = E(T_theta(I_r)) and the DDIM
   inversion (Eq. 3) to the trajectory ``[x*_0, ..., x*_T]``.
6. :func:`~hifi.algorithms.guidance.reference_guided_sample`: Algorithm 2 from the same
   x_T, with Eq. 10 (:mod:`hifi.algorithms.guidance`, which also says how steps are counted).

The model callable and the optimiser-step factory arrive ready from the edge
(:mod:`hifi.execution.edge`); the defaults are ``backend.denoise`` and eager Adam.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import attrs
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hifi.algorithms.attention import AttentionStore, observed_attention
from hifi.algorithms.generate import generate, initial_noise, step_conditions
from hifi.algorithms.guidance import StepLosses, check_guidance_window, reference_guided_sample
from hifi.algorithms.sampling import ddim_invert
from hifi.algorithms.subject import Subject, content_tokens
from hifi.errors import HifiError
from hifi.execution.edge import StepFactory, adam_steps
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import DdimGrid
from hifi.kernels.latents import binarize_mask
from hifi.kernels.losses import resize_mask
from hifi.kernels.similarity import cosine_similarity_matrix
from hifi.kernels.transform import SimilarityFit, fit_similarity_transform, warp_image, warp_mask
from hifi.perception import ImageEmbedder, Perception, subject_attention
from hifi.protocols.denoiser import DenoiserBackend, Model

__all__ = [
    "Alignment",
    "FirstPass",
    "ReferenceChoice",
    "ReferenceGuided",
    "ReferenceSettings",
    "References",
    "align_reference",
    "choose_reference",
    "first_pass",
    "first_passes",
    "invert_reference",
    "invert_references",
    "latent_mask",
    "prepare_references",
    "reference_guided_generate",
    "reference_guided_generate_many",
    "subject_token_positions",
]

ATTENTION_MAX_QUERIES = 32 * 32
"""Record cross-attention of layers up to 32 x 32 (Stable Diffusion's 64 x 64 layers would
cost 4x the memory and, per prompt-to-prompt, add little)."""
ATTENTION_FROM = 0.5
"""Record the second half of the denoising steps: early on the subject tokens attend
everywhere alike, late they localise the subject (Figure 3)."""


@contextlib.contextmanager
def _progress(enabled: bool, total: int, desc: str) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()


# Settings ------------------------------------------------------------------------------


@attrs.frozen
class ReferenceSettings:
    """The knobs of reference-guided generation; defaults are the paper's (Section 4).

    ``naive=True`` recomputes both guidance branches with gradients in every phi_h step
    (for benchmarks; same result), see :func:`~hifi.algorithms.guidance.reference_guided_sample`.
    How the forwards and phi_h steps run is not a setting: it comes with the model and
    optimiser (:mod:`hifi.execution.edge`).
    """

    guidance: float = 7.5
    num_steps: int = 50
    t_start: int = 40
    t_end: int = 10
    phi_steps: int = 10
    phi_lr: float = 1e-2
    naive: bool = False

    def check(self) -> None:
        """Refuse settings Algorithm 2 cannot run (a clear :class:`HifiError`)."""
        if not math.isfinite(self.guidance):
            raise HifiError(f"--guidance must be a finite number, got {self.guidance}")
        check_guidance_window(self.num_steps, self.t_start, self.t_end, self.phi_steps, self.phi_lr)


# Step 1: I_g1 --------------------------------------------------------------------------


def subject_token_positions(backend: DenoiserBackend, subject: Subject, prompt: str) -> tuple[int, ...]:
    """Positions in the text sequence of the tokens that carry the subject.

    ``hifi`` mode: the last n positions, where c_s sits (Eq. 6). Other modes: the tokens of
    the rendered subject words ("sks dog", the placeholder) in the rendered prompt, found
    with :meth:`DenoiserBackend.token_ids` (empty when the words were truncated away).
    """
    if subject.mode == "hifi":
        return tuple(range(backend.max_length - subject.num_tokens, backend.max_length))
    sequence = backend.token_ids([subject.render_prompt(prompt)])[0].tolist()
    words = content_tokens(backend, subject.subject_words())
    for start in range(1, len(sequence) - len(words) + 1):
        if sequence[start : start + len(words)] == words:
            return tuple(range(start, start + len(words)))
    return ()


@attrs.frozen(eq=False)
class FirstPass:
    """Step 1: x_T, I_g1 ``[1, 3, H, W]`` and its latents; the subject tokens' attention ``[1, h, w]``
    (None when not recorded, or when the subject words were truncated from the prompt)."""

    seed: int
    x_T: Tensor
    image: Tensor
    latents: Tensor
    attention: Tensor | None
    positions: tuple[int, ...]


def first_pass(
    backend: DenoiserBackend,
    subject: Subject,
    prompt: str,
    seed: int,
    *,
    guidance: float = 7.5,
    num_steps: int = 50,
    record_attention: bool = True,
    progress: bool = False,
    model: Model | None = None,
) -> FirstPass:
    """Step 1 of Section 3.3: x_T from ``seed`` and I_g1 by Eq. 7 (exactly ``generate(..., [seed])``).

    With ``record_attention`` the subject tokens' cross-attention of the late steps is
    recorded through :func:`~hifi.algorithms.attention.observed_attention`, which changes no
    number; a pass that records runs ``backend.denoise`` itself (the recording is Python code
    in every forward, which a captured graph would skip), one that does not runs ``model``.
    Several seeds in one batch: :func:`first_passes`.
    """
    return first_passes(backend, subject, prompt, [seed], guidance=guidance, num_steps=num_steps,
                        record_attention=record_attention, progress=progress, model=model)[0]


def first_passes(
    backend: DenoiserBackend,
    subject: Subject,
    prompt: str,
    seeds: Sequence[int],
    *,
    guidance: float = 7.5,
    num_steps: int = 50,
    record_attention: bool = True,
    progress: bool = False,
    model: Model | None = None,
) -> list[FirstPass]:
    """:func:`first_pass` of every seed, drawn as one batch (``generate(..., seeds)``); one FirstPass per seed."""
    seeds = [int(s) for s in seeds]
    store = AttentionStore(max_queries=ATTENTION_MAX_QUERIES)
    first_recorded = int(num_steps * ATTENTION_FROM)

    def late_steps(layer: str, probs: Tensor, heads: int) -> Tensor:
        return store(layer, probs, heads) if store.step >= first_recorded else probs

    with _progress(progress, num_steps, f"I_g1 seeds {', '.join(map(str, seeds))}") as bar:

        def callback(i: int, t: int, x: Tensor) -> None:
            store.step = i + 1
            bar.update()

        recording = observed_attention(backend, late_steps) if record_attention else contextlib.nullcontext()
        with recording:
            drawn = generate(backend, subject, prompt, seeds, guidance=guidance, num_steps=num_steps,
                             callback=callback, model=None if record_attention else model)
    positions: tuple[int, ...] = ()
    attention = None
    if record_attention:
        positions = subject_token_positions(backend, subject, prompt)
        if positions:
            attention = subject_attention(store, positions, batch=len(seeds))
    x_T = initial_noise(backend, seeds)
    return [
        FirstPass(seed=seed, x_T=x_T[b : b + 1], image=drawn.images[b : b + 1], latents=drawn.latents[b : b + 1],
                  attention=None if attention is None else attention[b : b + 1], positions=positions)
        for b, seed in enumerate(seeds)
    ]


# Step 2: M_g ---------------------------------------------------------------------------


def latent_mask(mask: Tensor, latent_size: tuple[int, int]) -> Tensor:
    """An image-resolution mask ``[H, W]`` -> the boolean latent-grid mask ``[1, 1, h, w]``.

    Area resize (:func:`~hifi.kernels.losses.resize_mask`), then a cell is subject when more
    than half of its pixels are.
    """
    return binarize_mask(resize_mask(mask[None].float(), latent_size))


# Step 3: I_r ---------------------------------------------------------------------------


@attrs.frozen(eq=False)
class References:
    """The source photos ``[N, 3, H, W]`` in [-1, 1], their masks ``[N, H, W]`` (bool), names and embeddings."""

    images: Tensor
    masks: Tensor
    names: tuple[str, ...]
    embeddings: Tensor


def prepare_references(images: Tensor, masks: Tensor, names: Sequence[str], embedder: ImageEmbedder) -> References:
    """Embed the source photos once (Step 3 compares every I_g1 with them)."""
    if images.shape[0] == 0:
        raise HifiError("there are no source photos to take a reference from")
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:] or len(names) != images.shape[0]:
        raise HifiError(
            f"{images.shape[0]} source photos {tuple(images.shape[-2:])}, {masks.shape[0]} masks"
            f" {tuple(masks.shape[-2:])} and {len(names)} names do not match"
        )
    with torch.no_grad():
        embeddings = embedder.embed(images)
    return References(images=images, masks=masks.bool(), names=tuple(names), embeddings=embeddings)


@attrs.frozen
class ReferenceChoice:
    """The chosen source photo and the cosine similarity of every source to I_g1."""

    index: int
    scores: tuple[float, ...]


def choose_reference(query: Tensor, embeddings: Tensor) -> ReferenceChoice:
    """Step 3: the source whose embedding ``[N, D]`` has the highest cosine to ``query`` ``[D]`` or ``[1, D]``."""
    scores = cosine_similarity_matrix(query.reshape(1, -1), embeddings)[0]
    return ReferenceChoice(index=int(scores.argmax()), scores=tuple(float(s) for s in scores))


# Step 4: T_theta -----------------------------------------------------------------------


@attrs.frozen(eq=False)
class Alignment:
    """Step 4: the fitted T_theta*, the warped reference T(I_r) ``[3, H, W]`` and M_r* ``[H, W]`` (bool)."""

    fit: SimilarityFit
    image: Tensor
    mask: Tensor


def align_reference(image: Tensor, mask: Tensor, generated_mask: Tensor) -> Alignment:
    """Fit T_theta of M_r onto M_g (Eq. 8, 9, Algorithm 4) and warp I_r ``[3, H, W]`` and M_r ``[H, W]`` by it."""
    size = (int(generated_mask.shape[-2]), int(generated_mask.shape[-1]))
    try:
        fit = fit_similarity_transform(mask.float(), generated_mask.float())
    except ValueError as err:
        raise HifiError(f"cannot align the reference: {err}") from err
    matrix = fit.matrix.to(image.device)
    return Alignment(
        fit=fit,
        image=warp_image(image.float(), matrix, size),
        mask=warp_mask(mask.bool(), matrix, size),
    )


# Step 5: [x*_0, ..., x*_T] -------------------------------------------------------------


def invert_reference(
    backend: DenoiserBackend, image: Tensor, caption: str, *, num_steps: int = 50, progress: bool = False,
    model: Model | None = None,
) -> list[Tensor]:
    """Step 5: encode T(I_r) ``[3, H, W]`` to x*_0 and DDIM-invert it with c_r = E_text(caption) (Eq. 3).

    Returns ``[x*_0, ..., x*_T]``, each ``[1, C, h, w]``: the pivotal inversion of null-text
    inversion (guidance 1, the caption alone). ``model`` defaults to ``backend.denoise``.
    """
    return invert_references(backend, image[None], [caption], num_steps=num_steps, progress=progress, model=model)


def invert_references(
    backend: DenoiserBackend, images: Tensor, captions: Sequence[str], *, num_steps: int = 50,
    progress: bool = False, model: Model | None = None,
) -> list[Tensor]:
    """:func:`invert_reference` of B warped references ``[B, 3, H, W]``, each its caption, as one batch."""
    run = model or backend.denoise
    with torch.no_grad(), _progress(progress, num_steps, "inversion") as bar:

        def counted(x: Tensor, t: int, cond: Condition) -> Tensor:
            bar.update()
            return run(x, t, cond)

        x0 = backend.encode_images(images)
        c_r = backend.encode_text(list(captions))
        return ddim_invert(counted, DdimGrid.build(backend.schedule, num_steps), x0, c_r)


# All six -------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class ReferenceGuided:
    """One image of reference-guided generation, with every stage's result.

    ``image`` ``[3, H, W]`` is I_g2, or I_g1 when the image fell back to plain generation
    (``fallback`` then says why, and the later stages are None).
    """

    seed: int
    prompt: str
    image: Tensor
    latents: Tensor
    first: FirstPass
    generated_mask: Tensor | None
    reference: ReferenceChoice | None = None
    reference_name: str | None = None
    alignment: Alignment | None = None
    caption: str | None = None
    losses: tuple[StepLosses, ...] = ()
    fallback: str | None = None
    warnings: tuple[str, ...] = ()


def reference_guided_generate(
    backend: DenoiserBackend,
    subject: Subject,
    prompt: str,
    seed: int,
    references: References,
    perception: Perception,
    *,
    settings: ReferenceSettings | None = None,
    progress: bool = False,
    model: Model | None = None,
    optimiser: StepFactory = adam_steps,
) -> ReferenceGuided:
    """Section 3.3 for one seed: steps 1-6 (module docstring); falls back to I_g1 without a subject.

    An I_g1 in which the segmenter finds no subject (or whose warped reference mask covers
    no latent cell) is returned as it is, with the reason in ``fallback`` and ``warnings``.
    ``model`` (default ``backend.denoise``) and ``optimiser`` come ready from the edge: one
    :class:`~hifi.execution.edge.Execution` serves every image of a run. Several seeds in one
    batch: :func:`reference_guided_generate_many`.
    """
    return reference_guided_generate_many(backend, subject, prompt, [seed], references, perception,
                                          settings=settings, progress=progress, model=model, optimiser=optimiser)[0]


def reference_guided_generate_many(
    backend: DenoiserBackend,
    subject: Subject,
    prompt: str,
    seeds: Sequence[int],
    references: References,
    perception: Perception,
    *,
    settings: ReferenceSettings | None = None,
    progress: bool = False,
    model: Model | None = None,
    optimiser: StepFactory = adam_steps,
) -> list[ReferenceGuided]:
    """:func:`reference_guided_generate` of every seed, the B images in one batch at each stage that runs the model.

    The first passes are one batch (:func:`first_passes`); each image then gets its own
    mask, reference, transform and caption; the references' inversions are one batch
    (:func:`invert_references`), and Algorithm 2 runs every image that did not fall back in
    one loop, one phi_h each (:func:`~hifi.algorithms.guidance.reference_guided_sample`).
    Each image equals its batch-of-one result within rounding (``tests/test_batching.py``).
    """
    model = model or backend.denoise
    settings = settings or ReferenceSettings()
    settings.check()
    segmenter = perception.segmenter
    firsts = first_passes(
        backend, subject, prompt, seeds, guidance=settings.guidance, num_steps=settings.num_steps,
        record_attention=segmenter.wants_attention, progress=progress, model=model,
    )
    results: list[ReferenceGuided | None] = []
    guided: list[tuple[int, Tensor, ReferenceChoice, Alignment, Tensor, str]] = []
    for first in firsts:

        def fall_back(reason: str, generated_mask: Tensor | None = None, first: FirstPass = first) -> ReferenceGuided:
            return ReferenceGuided(
                seed=first.seed, prompt=prompt, image=first.image[0], latents=first.latents, first=first,
                generated_mask=generated_mask, fallback=reason,
                warnings=(f"seed {first.seed}: {reason}; this image is the plain generation",),
            )

        if segmenter.wants_attention and first.attention is None:
            results.append(fall_back(
                f"the subject words are not in the (truncated) prompt {subject.render_prompt(prompt)!r}"))
            continue
        latent_size = (int(first.latents.shape[-2]), int(first.latents.shape[-1]))
        with torch.no_grad():
            mask_g = segmenter.segment(first.image, subject.class_name, first.attention)[0].bool()
        if not bool(latent_mask(mask_g, latent_size).any()):
            results.append(fall_back(f"the {segmenter.name} segmenter found no {subject.class_name} in I_g1", mask_g))
            continue
        with torch.no_grad():
            choice = choose_reference(perception.embedder.embed(first.image), references.embeddings)
        source_image = references.images[choice.index].to(backend.device)
        source_mask = references.masks[choice.index].to(backend.device)
        alignment = align_reference(source_image, source_mask, mask_g)
        mask_star = latent_mask(alignment.mask, latent_size)
        if not bool(mask_star.any()):
            results.append(fall_back("the aligned reference mask M_r* covers no latent cell", mask_g))
            continue
        caption = perception.captioner.caption(source_image[None], subject.class_name)[0]
        guided.append((len(results), mask_g, choice, alignment, mask_star, caption))
        results.append(None)

    if guided:
        rows = [firsts[index] for index, *_ in guided]
        trajectory = invert_references(backend, torch.stack([g[3].image for g in guided]), [g[5] for g in guided],
                                       num_steps=settings.num_steps, progress=progress, model=model)
        grid = DdimGrid.build(backend.schedule, settings.num_steps)
        with torch.no_grad():
            conds = step_conditions(backend, subject, prompt, grid)
        with _progress(progress, settings.num_steps, f"guided seeds {', '.join(str(f.seed) for f in rows)}") as bar:
            sample = reference_guided_sample(
                model, grid, torch.cat([f.x_T for f in rows]), conds, trajectory, torch.cat([g[4] for g in guided]),
                uncond=backend.null_embedding(), guidance=settings.guidance,
                t_start=settings.t_start, t_end=settings.t_end, phi_steps=settings.phi_steps, phi_lr=settings.phi_lr,
                naive=settings.naive, callback=lambda i, t, x: bar.update(), optimiser=optimiser,
            )
        with torch.no_grad():
            images = backend.decode_latents(sample.latents)
        warnings: tuple[str, ...] = ()
        if settings.guidance == 1.0 and settings.phi_steps > 0:
            warnings = ("guidance 1 ignores phi, so the phi_h steps cannot change the image",)
        for b, (index, mask_g, choice, alignment, _, caption) in enumerate(guided):
            first = firsts[index]
            results[index] = ReferenceGuided(
                seed=first.seed, prompt=prompt, image=images[b], latents=sample.latents[b : b + 1], first=first,
                generated_mask=mask_g, reference=choice, reference_name=references.names[choice.index],
                alignment=alignment, caption=caption, losses=sample.image_losses[b], warnings=warnings,
            )
    return [r for r in results if r is not None]
