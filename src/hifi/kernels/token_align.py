"""Token alignment between a caption and its edit, for prompt-to-prompt (Section 3.4).

Algorithm 3 edits the caption c^r of a photo into c^g by swapping one word ("a photo of
a cat" -> "a photo of a dog"). The new word may have a different number of tokens than
the old one, so every token after it moves; prompt-to-prompt's ``seq_aligner`` answers
"which source position holds this target token?" so that each target token can be given
the stored cross-attention map of its source counterpart. An edit here is one contiguous
run of changed tokens: the common prefix and the common suffix of the two token lists
are the unchanged words.

Pure functions of token ids and strings; nothing here knows a tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

__all__ = ["TokenAlignment", "align_tokens", "edit_span", "swap_word"]


@attrs.frozen(eq=False)
class TokenAlignment:
    """Where each token of an edited caption's encoded sequence comes from.

    Attributes:
        index: ``[L]`` long, the source position holding the same token, -1 for none.
        edited: ``[L]`` bool, the positions of the changed tokens (the new words).
    """

    index: Tensor
    edited: Tensor


def swap_word(text: str, word: str, replacement: str) -> str:
    """Replace the first whole-word occurrence of ``word`` in ``text`` (any case) with ``replacement``.

    Raises ValueError when ``text`` does not contain ``word`` as a word.
    """
    pattern = re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE)
    if not word.strip() or pattern.search(text) is None:
        raise ValueError(f"{word!r} is not a word of {text!r}")
    return pattern.sub(lambda _: replacement, text, count=1)


def edit_span(source: Sequence[int], target: Sequence[int]) -> tuple[int, int, int]:
    """The changed run of an edit: ``(start, source_stop, target_stop)``.

    ``source[start:source_stop]`` was replaced by ``target[start:target_stop]``; the tokens
    before ``start`` and the ``len(source) - source_stop`` tokens after the run are the
    same in both. Identical lists give an empty run at the end.
    """
    start = 0
    while start < min(len(source), len(target)) and source[start] == target[start]:
        start += 1
    suffix = 0
    while (
        suffix < min(len(source), len(target)) - start
        and source[len(source) - 1 - suffix] == target[len(target) - 1 - suffix]
    ):
        suffix += 1
    return start, len(source) - suffix, len(target) - suffix


def align_tokens(source: Sequence[int], target: Sequence[int], length: int, offset: int = 1) -> TokenAlignment:
    """For each position of the target's encoded sequence, the source position of the same token.

    ``source`` and ``target`` are the two prompts' token ids without special tokens; the
    encoded sequences hold them from position ``offset`` on (1: after the start token),
    then the end token and padding up to ``length``. In the index, the prefix maps to
    itself, everything after the changed run (the rest of the words, the end token, the
    padding) maps to its source position shifted by the change in length, and the
    changed tokens, and any that would map past the end, are -1 (no counterpart).
    """
    start, source_stop, target_stop = edit_span(source, target)
    shift = target_stop - source_stop
    index = torch.arange(length) - shift
    index[: offset + start] = torch.arange(min(offset + start, length))
    index[offset + start : offset + target_stop] = -1
    index[(index < 0) | (index >= length)] = -1
    edited = torch.zeros(length, dtype=torch.bool)
    edited[offset + start : offset + target_stop] = True
    return TokenAlignment(index=index, edited=edited)
