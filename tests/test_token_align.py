"""Token alignment of an edited caption (prompt-to-prompt's seq_aligner, for one swapped run)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hifi.kernels.token_align import align_tokens, edit_span, swap_word

BOS, EOS = 1000, 1001
tokens = st.lists(st.integers(0, 5), max_size=8)


def encoded(ids: list[int], length: int) -> list[int]:
    """How a CLIP text encoder sees a prompt: start, tokens, end, end-token padding."""
    return ([BOS, *ids, EOS] + [EOS] * length)[:length]


@given(prefix=tokens, old=tokens, new=tokens, suffix=tokens)
def test_every_aligned_token_is_the_same_token(prefix, old, new, suffix):
    source, target = prefix + old + suffix, prefix + new + suffix
    length = 24
    alignment = align_tokens(source, target, length)
    index = alignment.index
    src, tgt = encoded(source, length), encoded(target, length)
    assert index.shape == (length,) and index.dtype == torch.long
    for j, i in enumerate(index.tolist()):
        if i >= 0:
            assert tgt[j] == src[i]
    aligned = index[index >= 0]
    assert torch.all(aligned[1:] > aligned[:-1]), "the alignment keeps the order and never repeats"
    start, _, target_stop = edit_span(source, target)
    assert torch.all(index[alignment.edited] == -1), "the new tokens have no source"
    assert alignment.edited.sum() == min(target_stop, length - 1) - min(start, length - 1)
    assert (index < 0).sum() <= (target_stop - start) + abs(len(new) - len(old)), "nothing else is lost"


@given(ids=tokens)
def test_an_unchanged_caption_aligns_to_itself(ids):
    alignment = align_tokens(ids, ids, 16)
    assert torch.equal(alignment.index, torch.arange(16)) and not alignment.edited.any()


@given(prefix=tokens, old=tokens, new=tokens, suffix=tokens)
def test_edit_span_brackets_the_change(prefix, old, new, suffix):
    source, target = prefix + old + suffix, prefix + new + suffix
    start, source_stop, target_stop = edit_span(source, target)
    assert source[:start] == target[:start]
    assert source[source_stop:] == target[target_stop:]
    assert target_stop - start <= len(new) and source_stop - start <= len(old), "the run is the smallest"
    assert source[:start] + target[start:target_stop] + source[source_stop:] == target


def test_a_longer_word_shifts_everything_after_it():
    # "a photo of a cat on the beach" -> "a photo of a sks dog on the beach": cat (1) -> sks dog (2)
    source = [1, 2, 3, 1, 7, 8, 9, 10]
    target = [1, 2, 3, 1, 5, 6, 8, 9, 10]
    alignment = align_tokens(source, target, 12)
    assert alignment.index.tolist() == [0, 1, 2, 3, 4, -1, -1, 6, 7, 8, 9, 10]
    assert alignment.edited.nonzero().flatten().tolist() == [5, 6]


def test_a_shorter_word_leaves_the_last_positions_without_a_source():
    alignment = align_tokens([1, 2, 7, 7, 3], [1, 2, 5, 3], 8)
    assert alignment.index.tolist() == [0, 1, 2, -1, 5, 6, 7, -1]
    assert alignment.edited.nonzero().flatten().tolist() == [3]


def test_swap_word_replaces_a_whole_word_once():
    assert swap_word("a cat and a Cat on a catamaran", "cat", "dog") == "a dog and a Cat on a catamaran"
    assert swap_word("A CAT.", "cat", "<subject>") == "A <subject>."
    assert swap_word("a teddy bear", "teddy bear", "dog") == "a dog"
    with pytest.raises(ValueError, match="catamaran"):
        swap_word("a catamaran", "cat", "dog")
    with pytest.raises(ValueError):
        swap_word("a cat", " ", "dog")
