"""Checks at the edge: what a workflow refuses, or warns about, before it does any work.

Each is cheap and raises :class:`~hifi.errors.HifiError` with one line that says what to
change (the flag to fix, by its command-line name), so that a user's mistake never costs a
model load or minutes of steps and never reaches a kernel, whose own ``ValueError`` would
be a traceback. The tokenizer checks need the optional
:class:`~hifi.protocols.denoiser.VocabularyBackend`; a backend without it skips them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from hifi.algorithms.subject import PLACEHOLDER, SUBJECT_SLOT, Subject
from hifi.algorithms.tune import TuneConfig, caption_for
from hifi.errors import HifiError
from hifi.io.images import check_writable
from hifi.protocols.denoiser import DenoiserBackend, VocabularyBackend, lora_backend, textual_inversion

__all__ = [
    "MAX_SEED",
    "check_finite",
    "check_prompts_fit",
    "check_seeds",
    "check_step_count",
    "check_subject_prompts",
    "check_tune",
    "check_tune_config",
    "unknown_word_warnings",
]

MAX_SEED = 2**64 - 1
"""The largest seed ``torch.Generator.manual_seed`` takes (it maps negative ones onto large ones)."""


def check_seeds(first: int, count: int = 1, flag: str = "--seed") -> None:
    """Seeds ``first .. first + count - 1`` must be whole numbers in 0..:data:`MAX_SEED`."""
    if first < 0 or first + count - 1 > MAX_SEED:
        raise HifiError(f"{flag} must be a whole number in 0..{MAX_SEED - count + 1}, got {first}")


def check_finite(values: Mapping[str, float | None]) -> None:
    """Every value given (None: not given) a finite number: a NaN or an infinity slips past ``> 0``
    tests and poisons every step."""
    for flag, value in values.items():
        if value is not None and not math.isfinite(value):
            raise HifiError(f"{flag} must be a finite number, got {value}")


def check_step_count(num_steps: int, num_train_timesteps: int | None, flag: str = "--steps") -> None:
    """A DDIM step count the model's schedule can take: 1..its training timesteps (1000 for SD)."""
    top = num_train_timesteps or num_steps
    if not 1 <= num_steps <= top:
        raise HifiError(f"{flag} (the DDIM steps T) must be in 1..{top}, the model's training timesteps;"
                        f" got {num_steps}")


def check_prompts_fit(
    backend: DenoiserBackend, prompts: Sequence[str], *, reserved: int = 0, flag: str = "--prompt"
) -> None:
    """Each prompt, as encoded, fits the text window beside the start and end tokens and ``reserved`` c_s slots.

    A longer one would be cut, and in ``hifi`` mode its last tokens would sit where c_s goes.
    """
    if not isinstance(backend, VocabularyBackend):
        return
    room = backend.max_length - 2 - reserved
    slots = f" and the last {reserved} for c_s (--tokens)" if reserved else ""
    for prompt, length in zip(prompts, backend.prompt_lengths(prompts), strict=True):
        if length > room:
            fix = "lower --tokens" if room < 1 else f"shorten it to at most {room} tokens"
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            raise HifiError(
                f"{flag} {shown!r} is {length} tokens, but backend {backend.name!r} reads {backend.max_length}"
                f" positions, less a start and an end token{slots}: {fix}"
            )


def check_subject_prompts(
    backend: DenoiserBackend, subject: Subject, prompts: Sequence[str], flag: str = "--prompt"
) -> None:
    """The prompts in the subject's wording (:meth:`Subject.render_prompt`) fit beside its c_s."""
    rendered = [subject.render_prompt(p) for p in prompts]
    if subject.mode == "classic-ti":
        textual_inversion(backend).add_placeholder_token(PLACEHOLDER)  # one token, as encoding makes it
    check_prompts_fit(backend, rendered, reserved=subject.num_tokens if subject.mode == "hifi" else 0, flag=flag)


def check_tune_config(config: TuneConfig, out: str | Path) -> None:
    """What a tune refuses before a model loads: a NaN or infinite rate, a bad seed, an output folder
    that cannot be written (:class:`TuneConfig` itself refuses negative counts). Creates nothing."""
    check_finite({"--lr": config.learning_rate, "--reg-weight": config.reg_weight})
    check_seeds(config.seed)
    check_writable(out)


def check_tune(backend: DenoiserBackend, class_name: str, config: TuneConfig) -> None:
    """What a tune on this backend would fail on only after its steps: the DDIM grid, the caption's room,
    and LoRA adapters the backend cannot carry."""
    check_step_count(config.num_steps, backend.schedule.num_train_timesteps, "--ddim-steps")
    if config.lora_rank is not None:
        lora_backend(backend)
    if config.mode != "classic-ti":  # the classic-TI caption holds the placeholder, not the class word
        reserved = config.num_tokens if config.mode == "hifi" else 0
        check_prompts_fit(backend, [caption_for(config.mode, class_name)], reserved=reserved,
                          flag="--class-name: the tune's caption")


def unknown_word_warnings(
    backend: DenoiserBackend, prompts: Sequence[str], class_name: str | None = None
) -> tuple[str, ...]:
    """One warning (or none) naming the words of the prompts and the class word the backend does not know."""
    if not isinstance(backend, VocabularyBackend):
        return ()
    texts = [p.replace(SUBJECT_SLOT, class_name or " ") for p in prompts] + ([class_name] if class_name else [])
    unknown = backend.unknown_words(texts)
    if not unknown:
        return ()
    words = ", ".join(repr(w) for w in unknown)
    if len(unknown) == 1:
        return (f"backend {backend.name!r} does not know the word {words}: its tokenizer has no token for it,"
                " so the model cannot draw what it names",)
    return (f"backend {backend.name!r} does not know the words {words}: its tokenizer has no token for them,"
            " so the model cannot draw what they name",)
