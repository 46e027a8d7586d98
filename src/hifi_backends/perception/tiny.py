"""Random tiny perception models built from configs, tokenizers included (``model="random:tiny"``).

Nothing is downloaded: each builder makes the real architecture (the same class the real
weights load into) at a toy size, seeded, so that tests and CI run every perception code
path in seconds. Their outputs are meaningless; their shapes and types are the real ones.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from hifi_backends.perception.pixels import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, PixelConfig
from hifi_backends.tokenizer import DEFAULT_WORDS, build_clip_tokenizer

__all__ = [
    "BERT_SPECIAL_IDS",
    "build_bert_tokenizer",
    "tiny_blip",
    "tiny_blip2",
    "tiny_clip",
    "tiny_grounding_dino",
    "tiny_sam",
    "tiny_segment_anything",
    "tiny_vit",
]

IMAGE_SIZE = 32
"""Input side of the tiny image encoders (SAM and Grounding DINO: 64)."""
TINY_IMAGENET = PixelConfig(resize=IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD, mode="bilinear")
TINY_CLIP = PixelConfig(resize=IMAGE_SIZE, mean=CLIP_MEAN, std=CLIP_STD, crop=IMAGE_SIZE)

BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
"""BERT's ids for its special tokens and the full stop: Grounding DINO finds phrase ends by these ids."""


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _vit(**extra: Any) -> dict[str, Any]:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                image_size=IMAGE_SIZE, patch_size=8, **extra)


def build_bert_tokenizer(words: Iterable[str] = DEFAULT_WORDS, extra_special: Iterable[str] = ()) -> Any:
    """A BertTokenizer from a vocabulary file written here: BERT's special ids, ``words``, ``extra_special``.

    The slots between BERT's special ids are ``[unusedN]`` as in the real vocabulary, so
    that ``[CLS]`` is 101 and ``.`` is 1012 exactly.
    """
    from transformers import BertTokenizer

    by_id = {i: t for t, i in BERT_SPECIAL_IDS.items()}
    vocab = [by_id.get(i, f"[unused{i}]") for i in range(max(by_id) + 1)]
    vocab += [w for w in dict.fromkeys(w.lower() for w in words) if w not in BERT_SPECIAL_IDS]
    vocab += list(extra_special)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tokenizer


def tiny_vit(seed: int = 0) -> tuple[Any, PixelConfig]:
    """DINO's architecture (``ViTModel``, no pooler) at 32x32, patch 8."""
    from transformers import ViTConfig, ViTModel

    with _seeded(seed):
        return ViTModel(ViTConfig(**_vit()), add_pooling_layer=False), TINY_IMAGENET


def tiny_clip(seed: int = 0) -> tuple[Any, Any, PixelConfig]:
    """``CLIPModel`` (text and vision towers, 16-wide projections) and a local CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_clip_tokenizer(model_max_length=32)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                vocab_size=len(tokenizer), max_position_embeddings=32,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    with _seeded(seed):
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=_vit(), projection_dim=16))
    return model, tokenizer, TINY_CLIP


def tiny_sam(seed: int = 0) -> Any:
    """transformers' ``SamModel``: 64x64 input, 8x8 embeddings, 32x32 low-resolution masks."""
    from transformers import SamConfig, SamModel

    config = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], num_pos_feats=8,
                           mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
    )
    with _seeded(seed):
        return SamModel(config)


def tiny_segment_anything(seed: int = 0) -> Any:
    """segment-anything's ``Sam`` assembled as ``build_sam._build_sam`` does, at 64x64 (``sam_vit_*`` in small)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    side, patch, dim = 64, 8, 16
    with _seeded(seed):
        return Sam(
            image_encoder=ImageEncoderViT(
                img_size=side, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim, image_embedding_size=(side // patch, side // patch), input_image_size=(side, side),
                mask_in_chans=4,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=32, num_heads=2),
                transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=16,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )


def tiny_grounding_dino(seed: int = 0) -> tuple[Any, Any]:
    """``GroundingDinoForObjectDetection`` over a tiny Swin and a tiny BERT, and a local BERT tokenizer."""
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    tokenizer = build_bert_tokenizer()
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2, image_size=64,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        num_queries=10, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, d_model=32,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2,
        max_text_len=32, disable_custom_kernels=True,
    )
    with _seeded(seed):
        return GroundingDinoForObjectDetection(config), tokenizer


def tiny_blip2(seed: int = 0) -> tuple[Any, Any, PixelConfig]:
    """``Blip2ForConditionalGeneration`` (ViT, Q-Former with 4 queries, OPT) and a local byte-level tokenizer."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    tokenizer = build_clip_tokenizer(model_max_length=32)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    config = Blip2Config(
        vision_config=_vit(),
        qformer_config=dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=37, encoder_hidden_size=32, max_position_embeddings=64),
        text_config=OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              ffn_dim=37, max_position_embeddings=64, word_embed_proj_dim=32,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=eos),
        num_query_tokens=4,
        image_token_index=image_token,
    )
    with _seeded(seed):
        return Blip2ForConditionalGeneration(config), tokenizer, TINY_CLIP


def tiny_blip(seed: int = 0) -> tuple[Any, Any, PixelConfig]:
    """``BlipForConditionalGeneration`` (ViT and a BERT-style decoder) and a local BERT tokenizer with ``[DEC]``."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    tokenizer = build_bert_tokenizer(extra_special=["[DEC]"])
    tokenizer.bos_token = "[DEC]"
    text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=37, encoder_hidden_size=32, max_position_embeddings=64,
                bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    with _seeded(seed):
        model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=_vit()))
    return model, tokenizer, TINY_CLIP
