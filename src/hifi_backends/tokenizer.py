"""A byte-level BPE tokenizer built locally, in CLIP's format, for models with random weights.

Stable Diffusion's tokenizer comes from the hub; tests and random-weight architectures
must not touch the network, so this builds a CLIP tokenizer from a vocabulary made here:
every byte as a symbol (so any text tokenizes), plus whole-word merges for a given word
list so that common words are single tokens, as in CLIP's real vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

DEFAULT_WORDS = (
    "a an the of in on at with and photo picture sks dog cat can candle toy car bowl "
    "backpack teapot vase sneaker glasses clock boot bear plushie sloth robot monster "
    "cartoon red blue green yellow purple white black shiny wet cube sitting beach snow "
    "grass jungle city street water floor table wooden brick wall mountain forest top "
    "bucket pillow rainbow scarf sunset night kitchen background"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def build_clip_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77
) -> CLIPTokenizer:
    """A CLIPTokenizer over bytes plus whole-word merges for ``words`` (lower case ASCII)."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        # Merge left to right: "dog</w>" = ((d o) g</w>): each prefix is a vocabulary entry.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            merged = left + right
            if merged not in vocab:
                merges.append((left, right))
                vocab[merged] = len(vocab)
            pieces = [merged] + pieces[2:]
    # Another word's merges can break a left-to-right chain (BPE applies the best-ranked
    # pair first: "ring" brings ("r", "i"), which splits "stripes" into "st" "ri" ...). So
    # tokenize each word with the merges so far and chain whatever pieces it falls into,
    # until every word is one token. New merges only join pieces of words that are not yet
    # single tokens, so words already whole stay whole.
    wanted = [w.lower() for w in dict.fromkeys(words)]
    for _ in range(16):
        tokenizer = _tokenizer(vocab, merges, model_max_length)
        split = {w: tokenizer.tokenize(w) for w in wanted}
        split = {w: pieces for w, pieces in split.items() if len(pieces) > 1}
        if not split:
            return tokenizer
        for pieces in split.values():
            while len(pieces) > 1:
                merged = pieces[0] + pieces[1]
                if (pieces[0], pieces[1]) not in merges:
                    merges.append((pieces[0], pieces[1]))
                vocab.setdefault(merged, len(vocab))
                pieces = [merged] + pieces[2:]
    raise RuntimeError(f"could not make single tokens of {sorted(split)}")


def _tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], model_max_length: int) -> CLIPTokenizer:
    full = dict(vocab)
    for special in (BOS, EOS):
        full[special] = len(full)
    return CLIPTokenizer(vocab=full, merges=list(merges), model_max_length=model_max_length)
