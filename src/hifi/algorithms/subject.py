"""A learned subject, whatever way it was learned, as the generation code sees it.

Three modes, one interface (:meth:`Subject.conditions`): the per-step text conditions
``c^t`` that the denoising loop of Eq. 1 / Eq. 7 uses.

- ``hifi``: c_s (n tokens in the text encoder's *output* space) spliced into the last n
  positions of the prompt embedding, ``[c, c_s]`` (Eq. 6), and, when learned, one c_s^t
  per DDIM timestep (Algorithm 1, used as ``[c, c_s^t]`` by Eq. 7).
- ``classic-ti``: Textual Inversion (Eq. 2): a placeholder token whose *input* embedding
  was learned; the text encoder runs on the prompt with that vector.
- ``dreambooth``: the subject lives in fine-tuned denoiser weights; the prompt names it
  with a rare identifier ("a sks dog").

Prompts name the subject with ``<subject>`` ("a <subject> on the beach") or with the
class word ("a dog on the beach"); :meth:`Subject.render_prompt` turns either into the
mode's wording.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import attrs
import torch
from torch import Tensor

from hifi.errors import HifiError
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import Timestep
from hifi.kernels.losses import splice_subject
from hifi.protocols.denoiser import DenoiserBackend, textual_inversion

Mode = Literal["hifi", "classic-ti", "dreambooth", "plain"]
MODES: tuple[Mode, ...] = ("hifi", "classic-ti", "dreambooth")
"""The ways of learning a subject. ``plain`` (no learned subject: prompts take the bare
class word) is a Subject's mode too, for the untuned baselines, but nothing is tuned in it."""
SUBJECT_SLOT = "<subject>"
PLACEHOLDER = "<hifi-subject>"
"""The classic Textual Inversion token (diffusers' ``load_textual_inversion`` name)."""
IDENTIFIER = "sks"
"""DreamBooth's rare identifier word."""

__all__ = [
    "IDENTIFIER", "MODES", "PLACEHOLDER", "SUBJECT_SLOT", "Mode", "Subject", "content_tokens",
]


def content_tokens(backend: DenoiserBackend, prompt: str) -> list[int]:
    """The prompt's token ids between the start and end tokens, as :meth:`DenoiserBackend.token_ids`
    lays them out (the empty prompt's second id is the end token; truncated as the encoder sees it)."""
    ids = backend.token_ids([prompt, ""])
    row, end_token = [int(i) for i in ids[0]], int(ids[1, 1])
    stop = row.index(end_token, 1) if end_token in row[1:] else len(row)
    return row[1:stop]


@attrs.frozen(eq=False)
class Subject:
    """A learned subject.

    Attributes:
        class_name: the subject's class word ("dog", "can").
        mode: how it was learned (see the module docstring).
        c_s: ``[n, D]``, the global subject representation (``hifi`` mode).
        stepwise: ``{timestep: c_s^t}`` from Algorithm 1 (``hifi`` mode; may be empty).
        token_vector: ``[D_in]``, the learned input embedding of :data:`PLACEHOLDER`
            (``classic-ti`` mode).
    """

    class_name: str
    mode: Mode = "hifi"
    c_s: Tensor | None = None
    stepwise: Mapping[Timestep, Tensor] = attrs.field(factory=dict)
    token_vector: Tensor | None = None

    def __attrs_post_init__(self) -> None:
        if self.mode not in (*MODES, "plain"):
            raise HifiError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.mode == "hifi" and self.c_s is None:
            raise HifiError("a hifi subject needs c_s")
        if self.mode == "classic-ti" and self.token_vector is None:
            raise HifiError("a classic-ti subject needs its token vector")

    @property
    def num_tokens(self) -> int:
        return 0 if self.c_s is None else int(self.c_s.shape[-2])

    @classmethod
    def plain(cls, class_name: str) -> Subject:
        """No learned subject: ``<subject>`` becomes the bare class word (the "no tuning" row)."""
        return cls(class_name=class_name, mode="plain")

    def subject_words(self) -> str:
        """How prompts name the subject in this mode."""
        if self.mode == "classic-ti":
            return PLACEHOLDER
        if self.mode == "dreambooth":
            return f"{IDENTIFIER} {self.class_name}"
        return self.class_name

    def render_prompt(self, prompt: str) -> str:
        """Replace ``<subject>`` (or else the first class word) with :meth:`subject_words`."""
        words = self.subject_words()
        if SUBJECT_SLOT in prompt:
            return prompt.replace(SUBJECT_SLOT, words)
        padded = f" {prompt} "
        needle = f" {self.class_name} "
        if needle in padded:
            return padded.replace(needle, f" {words} ", 1).strip()
        if self.mode in ("hifi", "plain"):
            return prompt  # c_s is spliced at the end whatever the prompt says; plain has no subject
        raise HifiError(
            f"the prompt {prompt!r} names no subject: write {SUBJECT_SLOT} or the class word"
            f" {self.class_name!r} where the subject goes"
        )

    def encode(self, backend: DenoiserBackend, prompts: Sequence[str]) -> Condition:
        """The prompts' conditions c in this mode's wording (before any c_s)."""
        rendered = [self.render_prompt(p) for p in prompts]
        if self.mode == "classic-ti":
            assert self.token_vector is not None
            textual_inversion(backend).add_placeholder_token(PLACEHOLDER)
            return backend.encode_text(rendered, token_embeddings={PLACEHOLDER: self.token_vector})
        return backend.encode_text(rendered)

    def c_s_at(self, t: Timestep) -> Tensor | None:
        """c_s^t for timestep t: the step-wise one of the nearest learned timestep, else c_s."""
        if not self.stepwise:
            return self.c_s
        nearest = min(self.stepwise, key=lambda k: (abs(k - t), k))
        return self.stepwise[nearest]

    def conditions(self, c: Condition, timesteps: Sequence[Timestep]) -> list[Condition]:
        """``[c, c_s^t]`` for each timestep of a DDIM grid (Eq. 7); plain c without c_s."""
        if self.mode != "hifi":
            return [c] * len(timesteps)
        out = []
        for t in timesteps:
            c_s = self.c_s_at(t)
            assert c_s is not None
            out.append(splice_subject(c, c_s.to(device=c.device, dtype=c.dtype)))
        return out

    def to(self, device: torch.device | str) -> Subject:
        """A copy with every tensor on ``device``."""
        def move(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device)

        return attrs.evolve(
            self,
            c_s=move(self.c_s),
            stepwise={t: v.to(device) for t, v in self.stepwise.items()},
            token_vector=move(self.token_vector),
        )
