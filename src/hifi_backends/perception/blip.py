"""Captions for the reference photo: BLIP-2 (the paper's, Section 3.3) and the lighter BLIP.

The caption becomes c_r, the prompt of the reference's DDIM inversion, and in subject
replacement (Section 3.4) its class word is swapped for the new subject's: a caption must
name the class. Each image is captioned freely first (greedy decoding); a caption without
the class word is redone conditioned on the prefix ``"a photo of a <class>"``, which the
model continues, so every caption names it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor

from hifi.errors import HifiError
from hifi.perception.models import BLIP2_MODEL_ENV, BLIP_MODEL_ENV, ModelSlot
from hifi_backends.perception.loading import (
    load_image_text_model,
    pick_device,
    pick_dtype,
    place,
    with_slots,
)
from hifi_backends.perception.pixels import CLIP_MEAN, CLIP_STD, PixelConfig, to_model_pixels
from hifi_backends.perception.tiny import tiny_blip, tiny_blip2

__all__ = [
    "BLIP2_SLOT",
    "BLIP_SLOT",
    "BlipCaptioner",
    "build_blip2_captioner",
    "build_blip_captioner",
    "names_class",
]

BLIP2_SLOT = ModelSlot("BLIP-2", BLIP2_MODEL_ENV, "Salesforce/blip2-opt-2.7b")
BLIP_SLOT = ModelSlot("BLIP", BLIP_MODEL_ENV, "Salesforce/blip-image-captioning-base")
PREFIX = "a photo of a {class_name}"


def names_class(caption: str, class_name: str) -> bool:
    """Whether ``caption`` holds the class word (or its plural) as a whole word, any case."""
    word = re.escape(class_name.strip().lower())
    return re.search(rf"\b{word}(s|es)?\b", caption.lower()) is not None


Generate = Callable[[Any, Tensor, "str | None", int], Tensor]
"""``(captioner, pixels, prefix or None, max_new_tokens) -> token ids [B, T]``."""


def _generate_blip2(captioner: BlipCaptioner, pixels: Tensor, prefix: str | None, max_new_tokens: int) -> Tensor:
    """BLIP-2: the image tokens (one per Q-Former query) ahead of the text, as ``Blip2Processor`` builds them."""
    config = captioner.model.config
    image_token = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    if image_token is None:
        raise HifiError("this BLIP-2 checkpoint has no image token id (image_token_index); re-save it with a"
                        " recent transformers")
    ids = [image_token] * config.num_query_tokens + captioner.tokenizer(prefix or "").input_ids
    input_ids = torch.tensor([ids] * pixels.shape[0], device=pixels.device)
    return captioner.model.generate(
        pixel_values=pixels, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
    )


def _generate_blip(captioner: BlipCaptioner, pixels: Tensor, prefix: str | None, max_new_tokens: int) -> Tensor:
    """BLIP: the decoder starts from ``[DEC]``, or continues the prefix (whose ``[CLS]`` the model swaps for it)."""
    kwargs: dict[str, Any] = {}
    if prefix is not None:
        tokens = captioner.tokenizer([prefix] * pixels.shape[0], return_tensors="pt")
        kwargs = {"input_ids": tokens.input_ids.to(pixels.device),
                  "attention_mask": tokens.attention_mask.to(pixels.device)}
    return captioner.model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    **kwargs)


@attrs.frozen(eq=False)
class BlipCaptioner:
    """:class:`~hifi.perception.Captioner` over ``Blip2ForConditionalGeneration`` or ``BlipForConditionalGeneration``.

    ``generate`` is the model family's call: :func:`_generate_blip2` or :func:`_generate_blip`.
    """

    model: Any
    tokenizer: Any
    pixels: PixelConfig
    generate: Generate
    name: str
    max_new_tokens: int = 30

    def _captions(self, images: Tensor, prefix: str | None) -> list[str]:
        param = next(self.model.parameters())
        pixels = to_model_pixels(images.to(param.device), self.pixels).to(param.dtype)
        with torch.no_grad():
            ids = self.generate(self, pixels, prefix, self.max_new_tokens)
        texts = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        if prefix is None:
            return texts
        return [t if t.lower().startswith(prefix.lower()) else f"{prefix} {t}".strip() for t in texts]

    def caption(self, images: Tensor, class_name: str) -> list[str]:
        captions = self._captions(images, None)
        redo = [k for k, c in enumerate(captions) if not names_class(c, class_name)]
        if redo:
            prefixed = self._captions(images[redo], PREFIX.format(class_name=class_name.strip()))
            for k, c in zip(redo, prefixed, strict=True):
                captions[k] = c
        return captions


def _build(slot: ModelSlot, model_class: Any, tiny: Callable[[], tuple[Any, Any, PixelConfig]], resize: int,
           generate: Any, name: str, model: str | None, device: str | None, dtype: str | None,
           max_new_tokens: int) -> BlipCaptioner:
    """A captioner from ``model`` (or the slot's variable or default): a random tiny one, or the weights."""
    net, tokenizer, pixels = load_image_text_model(slot, model_class, model, tiny,
                                                   PixelConfig(resize=resize, mean=CLIP_MEAN, std=CLIP_STD))
    return BlipCaptioner(place(net, pick_device(device), pick_dtype(dtype)), tokenizer, pixels, generate, name,
                         max_new_tokens)


@with_slots(BLIP2_SLOT)
def build_blip2_captioner(
    *, model: str | None = None, device: str | None = None, dtype: str | None = None, max_new_tokens: int = 30,
    backend: Any = None,
) -> BlipCaptioner:
    """Registry entry ``blip2``: ``model`` or ``$HIFI_BLIP2_MODEL`` or ``Salesforce/blip2-opt-2.7b``."""
    from transformers import Blip2ForConditionalGeneration

    return _build(BLIP2_SLOT, Blip2ForConditionalGeneration, tiny_blip2, 224, _generate_blip2, "blip2", model, device,
                  dtype, max_new_tokens)


@with_slots(BLIP_SLOT)
def build_blip_captioner(
    *, model: str | None = None, device: str | None = None, dtype: str | None = None, max_new_tokens: int = 30,
    backend: Any = None,
) -> BlipCaptioner:
    """Registry entry ``blip``: ``model`` or ``$HIFI_BLIP_MODEL`` or ``Salesforce/blip-image-captioning-base``."""
    from transformers import BlipForConditionalGeneration

    return _build(BLIP_SLOT, BlipForConditionalGeneration, tiny_blip, 384, _generate_blip, "blip", model, device,
                  dtype, max_new_tokens)
