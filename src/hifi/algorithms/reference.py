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
6. :func:`reference_guided_sample`: Algorithm 2 from the same x_T, with Eq. 10.

Step indices. Algorithm 2 counts its denoising loop ``t = T, ..., 1``, and t_s, t_e are
such indices: step ``t`` is the ``(T - t + 1)``-th denoising step, taken at the DDIM grid's
timestep ``ddim_timesteps(schedule, T)[T - t]``; it maps x_t to x_{t-1}, and x*_t is
``trajectory[t]``. With T = 50, t_s = 40 and t_e = 10 (the paper's values) the guidance
runs from the 11th denoising step to the 41st, 31 steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import attrs
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hifi.algorithms.attention import AttentionStore, observed_attention
from hifi.algorithms.generate import generate, initial_noise, step_conditions
from hifi.algorithms.sampling import Model, StepCallback, ddim_invert, guided_output, null_guided_step, per_step
from hifi.algorithms.subject import Subject
from hifi.errors import HifiError
from hifi.execution.fastpath import AdamStep, accelerate_model, timestep_tensor
from hifi.kernels.ddim import Schedule, cfg_combine, ddim_step, ddim_timesteps
from hifi.kernels.latents import binarize_mask, substitute_masked
from hifi.kernels.losses import masked_mse, resize_mask
from hifi.kernels.transform import SimilarityFit, fit_similarity_transform, warp_image, warp_mask
from hifi.perception import ImageEmbedder, Perception, subject_attention
from hifi.protocols.denoiser import DenoiserBackend

__all__ = [
    "Alignment",
    "FirstPass",
    "GuidedSample",
    "ReferenceChoice",
    "ReferenceGuided",
    "ReferenceSettings",
    "References",
    "StepLosses",
    "align_reference",
    "check_guidance_window",
    "choose_reference",
    "first_pass",
    "invert_reference",
    "latent_mask",
    "prepare_references",
    "reference_guided_generate",
    "reference_guided_sample",
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


def check_guidance_window(num_steps: int, t_start: int, t_end: int, phi_steps: int, phi_lr: float = 1e-2) -> None:
    """Refuse a guidance window Algorithm 2 cannot run: ``1 <= t_e <= t_s <= T``, ``J >= 0``, ``lr > 0``."""
    if num_steps < 1:
        raise HifiError(f"the number of DDIM steps T must be at least 1, got {num_steps}")
    for name, value in (("t_s (--t-start)", t_start), ("t_e (--t-end)", t_end)):
        if not 1 <= value <= num_steps:
            raise HifiError(f"{name} must be a denoising step index in 1..T = 1..{num_steps}, got {value}")
    if t_start < t_end:
        raise HifiError(
            f"t_s = {t_start} is below t_e = {t_end}: guidance runs from step t_s down to step t_e,"
            " so t_s must be at least t_e"
        )
    if phi_steps < 0:
        raise HifiError(f"the phi_h steps per denoising step J (--phi-steps) must be >= 0, got {phi_steps}")
    if phi_steps > 0 and not phi_lr > 0:
        raise HifiError(f"the phi_h learning rate (--phi-lr) must be positive, got {phi_lr}")


@attrs.frozen
class ReferenceSettings:
    """The knobs of reference-guided generation; defaults are the paper's (Section 4).

    ``naive=True`` recomputes both guidance branches with gradients in every phi_h step
    (for benchmarks; same result), see :func:`reference_guided_sample`. ``accel`` runs the
    forwards and the phi_h steps eagerly, compiled, or as CUDA graphs (:mod:`hifi.execution.fastpath`).
    """

    guidance: float = 7.5
    num_steps: int = 50
    t_start: int = 40
    t_end: int = 10
    phi_steps: int = 10
    phi_lr: float = 1e-2
    naive: bool = False
    accel: str = "eager"

    def check(self) -> None:
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
    ids = backend.token_ids([subject.render_prompt(prompt), subject.subject_words(), ""]).tolist()
    eos = ids[2][1]  # "" is [BOS, EOS, padding...]
    words = ids[1][1 : ids[1].index(eos)]
    sequence = ids[0]
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
    accel: str = "eager",
) -> FirstPass:
    """Step 1 of Section 3.3: x_T from ``seed`` and I_g1 by Eq. 7 (exactly ``generate(..., [seed])``).

    With ``record_attention`` the subject tokens' cross-attention of the late steps is
    recorded through :func:`~hifi.algorithms.attention.observed_attention`, which changes no number;
    a pass that records runs eagerly (the recording is Python code in every forward), one
    that does not runs in mode ``accel``.
    """
    store = AttentionStore(max_queries=ATTENTION_MAX_QUERIES)
    first_recorded = int(num_steps * ATTENTION_FROM)

    def late_steps(layer: str, probs: Tensor, heads: int) -> Tensor:
        return store(layer, probs, heads) if store.step >= first_recorded else probs

    with _progress(progress, num_steps, f"I_g1 seed {seed}") as bar:

        def callback(i: int, t: int, x: Tensor) -> None:
            store.step = i + 1
            bar.update()

        recording = observed_attention(backend, late_steps) if record_attention else contextlib.nullcontext()
        with recording:
            drawn = generate(backend, subject, prompt, [seed], guidance=guidance, num_steps=num_steps,
                             callback=callback, accel="eager" if record_attention else accel)
    positions: tuple[int, ...] = ()
    attention = None
    if record_attention:
        positions = subject_token_positions(backend, subject, prompt)
        if positions:
            attention = subject_attention(store, positions, batch=1)
    return FirstPass(
        seed=int(seed), x_T=initial_noise(backend, [seed]), image=drawn.images, latents=drawn.latents,
        attention=attention, positions=positions,
    )


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
    scores = torch.nn.functional.cosine_similarity(query.reshape(1, -1).float(), embeddings.float(), dim=-1)
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
    accel: str = "eager",
) -> list[Tensor]:
    """Step 5: encode T(I_r) ``[3, H, W]`` to x*_0 and DDIM-invert it with c_r = E_text(caption) (Eq. 3).

    Returns ``[x*_0, ..., x*_T]``, each ``[1, C, h, w]``: the pivotal inversion of null-text
    inversion (guidance 1, the caption alone).
    """
    fast = accelerate_model(backend.denoise, backend.device, accel)
    with torch.no_grad(), _progress(progress, num_steps, "inversion") as bar:

        def model(x: Tensor, t: int, cond: Tensor) -> Tensor:
            bar.update()
            return fast(x, t, cond)

        x0 = backend.encode_images(image[None])
        c_r = backend.encode_text([caption])
        return ddim_invert(model, backend.schedule, x0, c_r, num_steps=num_steps)


# Step 6: Algorithm 2 -------------------------------------------------------------------


def _ddim(schedule: Schedule, out: Tensor, x: Tensor, t: int, stride: int) -> Tensor:
    """F^(t) of Eq. 1 given the guided model output at x_t."""
    return ddim_step(out, x, schedule.alpha(t), schedule.alpha(t - stride), schedule.prediction_type,
                     schedule.clip_sample_range)


@attrs.frozen
class StepLosses:
    """Eq. 10 at one guided step: the loss before each of the J phi_h updates, then after the last."""

    step: int
    timestep: int
    losses: tuple[float, ...]


@attrs.frozen(eq=False)
class GuidedSample:
    """Algorithm 2's x_0 and the phi_h losses of every guided step (t_s down to t_e)."""

    latents: Tensor
    losses: tuple[StepLosses, ...]


def reference_guided_sample(
    model: Model,
    schedule: Schedule,
    x_T: Tensor,
    cond: Tensor | Sequence[Tensor],
    trajectory: Sequence[Tensor],
    mask: Tensor,
    *,
    uncond: Tensor,
    guidance: float = 7.5,
    num_steps: int = 50,
    t_start: int = 40,
    t_end: int = 10,
    phi_steps: int = 10,
    phi_lr: float = 1e-2,
    naive: bool = False,
    callback: StepCallback | None = None,
    accel: str = "eager",
) -> GuidedSample:
    """Algorithm 2: denoise x_T with Eq. 7, guided inside M_r* by the reference trajectory.

    For t = T, ..., 1 (step indices, see the module docstring): at t = t_s the latents under
    ``mask`` are taken from x*_t; every step takes x_{t-1} = F^(t)(x_t, [c, c_s^t], phi); for
    t_s >= t >= t_e, phi_h takes ``phi_steps`` (J) Adam steps on Eq. 10,

        L_h(phi_h) = || x*_{t-1}[M] - F^(t)(x_t, [c, c_s^t], phi_h)[M] ||^2

    (as a mean over the masked latents, :func:`~hifi.kernels.losses.masked_mse`), and then
    x_{t-1}[M] = F^(t)(x_t, [c, c_s^t], phi_h)[M]. phi_h starts as phi (``uncond``) at t_s
    and carries over, with its Adam state, from step to step. ``mask`` is boolean
    ``[1 or B, 1, h, w]``; ``trajectory`` is ``[x*_0, ..., x*_T]``; ``cond`` one embedding or
    one per step (``[c, c_s^t]``).

    Cost: within a step the conditional branch eps(x_t, [c, c_s^t]) does not depend on
    phi_h, so it is computed once, without gradients (it also serves the step with phi),
    and each phi_h step differentiates the unconditional branch alone. ``naive=True``
    instead recomputes both branches with gradients at every phi_h step, as a literal
    reading does; the result is the same. phi_h is float32 whatever the model's dtype.
    ``accel`` (:mod:`hifi.execution.fastpath`) runs the no-gradient forwards and the phi_h steps
    eagerly, compiled, or as CUDA graphs; the losses are read back once, after the loop.
    """
    check_guidance_window(num_steps, t_start, t_end, phi_steps, phi_lr)
    if len(trajectory) != num_steps + 1:
        raise HifiError(
            f"the reference trajectory has {len(trajectory)} latents; Algorithm 2 needs T + 1 = {num_steps + 1}"
        )
    if mask.dtype != torch.bool or not bool(mask.any()):
        raise HifiError("the guidance mask M_r* must be a non-empty boolean latent mask")
    timesteps = ddim_timesteps(schedule, num_steps)
    stride = schedule.stride(num_steps)
    conds = per_step(cond, num_steps)
    device = x_T.device
    fast = accelerate_model(model, device, accel)
    weight = mask.float().expand(x_T.shape[0], 1, *mask.shape[-2:])

    def loss_of(net: Model) -> Callable[..., tuple[Tensor, Tensor]]:
        def l_h(phi: Tensor, x: Tensor, t: Tensor, a_t: Tensor, a_prev: Tensor, c: Tensor, target: Tensor,
                *out_cond: Tensor) -> tuple[Tensor, Tensor]:
            """Eq. 10 and F^(t)(x_t, [c, c_s^t], phi_h) in float32, as a function of tensors only."""
            x_guided = null_guided_step(net, schedule, x, t, a_t, a_prev, c, phi, guidance, *out_cond).float()
            return masked_mse(x_guided, target, weight), x_guided

        return l_h

    l_h, l_h_forward = loss_of(model), loss_of(fast)  # the step; the no-gradient evaluation

    # phi_h starts as phi at t_s and carries over, with its Adam state, from step to step.
    runner = AdamStep(l_h, uncond.detach().float().clone().requires_grad_(True), phi_lr, accel)
    step_losses: list[tuple[int, int, Tensor]] = []  # read back once, after the loop
    x = x_T.detach()
    for i, t in enumerate(timesteps):
        step = num_steps - i
        guided_step = t_end <= step <= t_start
        if step == t_start:
            x = substitute_masked(x, trajectory[step].to(x.dtype), mask)
        with torch.no_grad():
            if guided_step:
                out_cond = fast(x, t, conds[i])
                out = cfg_combine(out_cond, fast(x, t, uncond), guidance)
            else:
                out = guided_output(fast, x, t, conds[i], uncond, guidance)
            x_prev = _ddim(schedule, out, x, t, stride)
        if guided_step:
            alphas = torch.tensor([schedule.alpha(t), schedule.alpha(t - stride)], dtype=torch.float32,
                                  device=device)
            inputs = (x, timestep_tensor(t, device), alphas[0], alphas[1], conds[i],
                      trajectory[step - 1].float(), *(() if naive else (out_cond,)))
            losses = [runner(*inputs)[0] for _ in range(phi_steps)]  # J Adam steps on Eq. 10
            with torch.no_grad():
                loss, x_guided = l_h_forward(runner.param, *inputs)
            x_prev = torch.where(mask, x_guided.to(x_prev.dtype), x_prev)
            step_losses.append((step, t, torch.stack([*losses, loss])))
        x = x_prev
        if callback is not None:
            callback(i, t, x)
    records = tuple(StepLosses(step=step, timestep=t, losses=tuple(values.tolist()))
                    for step, t, values in step_losses)
    return GuidedSample(latents=x, losses=records)


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
) -> ReferenceGuided:
    """Section 3.3 for one seed: steps 1-6 (module docstring); falls back to I_g1 without a subject.

    An I_g1 in which the segmenter finds no subject (or whose warped reference mask covers
    no latent cell) is returned as it is, with the reason in ``fallback`` and ``warnings``.
    """
    settings = settings or ReferenceSettings()
    settings.check()
    segmenter = perception.segmenter
    first = first_pass(
        backend, subject, prompt, seed, guidance=settings.guidance, num_steps=settings.num_steps,
        record_attention=segmenter.wants_attention, progress=progress, accel=settings.accel,
    )

    def fall_back(reason: str, generated_mask: Tensor | None = None) -> ReferenceGuided:
        return ReferenceGuided(
            seed=first.seed, prompt=prompt, image=first.image[0], latents=first.latents, first=first,
            generated_mask=generated_mask, fallback=reason,
            warnings=(f"seed {first.seed}: {reason}; this image is the plain generation",),
        )

    if segmenter.wants_attention and first.attention is None:
        return fall_back(f"the subject words are not in the (truncated) prompt {subject.render_prompt(prompt)!r}")
    latent_size = (int(first.latents.shape[-2]), int(first.latents.shape[-1]))
    with torch.no_grad():
        mask_g = segmenter.segment(first.image, subject.class_name, first.attention)[0].bool()
    if not bool(latent_mask(mask_g, latent_size).any()):
        return fall_back(f"the {segmenter.name} segmenter found no {subject.class_name} in I_g1", mask_g)

    with torch.no_grad():
        choice = choose_reference(perception.embedder.embed(first.image), references.embeddings)
    source_image = references.images[choice.index].to(backend.device)
    source_mask = references.masks[choice.index].to(backend.device)
    alignment = align_reference(source_image, source_mask, mask_g)
    mask_star = latent_mask(alignment.mask, latent_size)
    if not bool(mask_star.any()):
        return fall_back("the aligned reference mask M_r* covers no latent cell", mask_g)

    caption = perception.captioner.caption(source_image[None], subject.class_name)[0]
    trajectory = invert_reference(backend, alignment.image, caption, num_steps=settings.num_steps, progress=progress,
                                  accel=settings.accel)
    with torch.no_grad():
        conds = step_conditions(backend, subject, prompt, settings.num_steps)
    with _progress(progress, settings.num_steps, f"guided seed {seed}") as bar:
        sample = reference_guided_sample(
            backend.denoise, backend.schedule, first.x_T, conds, trajectory, mask_star,
            uncond=backend.null_embedding(), guidance=settings.guidance, num_steps=settings.num_steps,
            t_start=settings.t_start, t_end=settings.t_end, phi_steps=settings.phi_steps, phi_lr=settings.phi_lr,
            naive=settings.naive, callback=lambda i, t, x: bar.update(), accel=settings.accel,
        )
    with torch.no_grad():
        image = backend.decode_latents(sample.latents)[0]
    warnings: tuple[str, ...] = ()
    if settings.guidance == 1.0 and settings.phi_steps > 0:
        warnings = ("guidance 1 ignores phi, so the phi_h steps cannot change the image",)
    return ReferenceGuided(
        seed=first.seed, prompt=prompt, image=image, latents=sample.latents, first=first, generated_mask=mask_g,
        reference=choice, reference_name=references.names[choice.index], alignment=alignment, caption=caption,
        losses=sample.losses, warnings=warnings,
    )
