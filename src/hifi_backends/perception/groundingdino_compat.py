"""The original Grounding DINO (``groundingdino-py``) on transformers 5, through one small adapter.

``groundingdino-py`` wraps its BERT text encoder in ``BertModelWarper``, which copies
``BertModel.get_extended_attention_mask``, ``invert_attention_mask`` and ``get_head_mask``
(gone in transformers 5) and calls the embeddings and encoder with arguments they no
longer take (``past_key_values_length``, ``head_mask``, ``output_attentions`` ...).
:class:`BertEncoderAdapter` does the same job with what transformers 5 has: the same
``embeddings``/``encoder``/``pooler`` submodules (so the original checkpoints' ``bert.*``
weights load unchanged) and the text self-attention mask turned into an additive mask
here. It replaces ``BertModelWarper`` only while :func:`build_groundingdino_py` builds a
model (nothing of ``groundingdino`` stays changed afterwards).

Everything else of ``groundingdino-py`` runs as shipped: its Swin backbone, its pure-PyTorch
multi-scale deformable attention (the package has no compiled kernels), its tokenizer
handling. Its checkpoints (``groundingdino_swint_ogc.pth``, ``groundingdino_swinb_cogcoor.pth``)
come with a config file of the package; the BERT config and tokenizer come from
``text_encoder`` (a local ``bert-base-uncased`` folder, or the hub id in the cache).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from hifi.errors import HifiError
from hifi_backends.perception.grounding_dino import (
    DETECTOR_MAX_SIDE,
    DETECTOR_SIDE,
    GROUNDING_DINO_SLOT,
    Detections,
    detection_query,
    detector_pixels,
    select_boxes,
)
from hifi_backends.perception.loading import first_line, load_state_dict, missing_model, place
from hifi_backends.perception.pixels import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["BertEncoderAdapter", "GroundingDinoPy", "build_groundingdino_py", "groundingdino_config"]


class BertEncoderAdapter(nn.Module):
    """``groundingdino``'s ``BertModelWarper`` for transformers 5: BERT without its mask helpers.

    Called with ``input_ids``, ``attention_mask`` (``[B, L]``, or ``[B, L, L]``: Grounding
    DINO lets each phrase attend only to itself), ``token_type_ids`` and ``position_ids``;
    returns ``last_hidden_state`` and ``pooler_output`` as the original does.
    """

    def __init__(self, bert_model: Any) -> None:
        super().__init__()
        self.config = bert_model.config
        self.embeddings: Any = bert_model.embeddings
        self.encoder: Any = bert_model.encoder
        self.pooler: Any = bert_model.pooler

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        **unused: Any,
    ) -> dict[str, Tensor | None]:
        hidden = self.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, device=input_ids.device)
        keep = attention_mask[:, None] if attention_mask.dim() == 3 else attention_mask[:, None, None]
        additive = (1.0 - keep.to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        out = self.encoder(hidden, attention_mask=additive)
        sequence = out[0]
        return {"last_hidden_state": sequence, "pooler_output": self.pooler(sequence) if self.pooler else None}


@contextlib.contextmanager
def _adapted() -> Iterator[None]:
    """``BertEncoderAdapter`` in place of ``BertModelWarper`` while a model is built, then the original back."""
    from groundingdino.models.GroundingDINO import groundingdino as module

    original = module.BertModelWarper
    module.BertModelWarper = BertEncoderAdapter
    try:
        yield
    finally:
        module.BertModelWarper = original


def groundingdino_config(name: str = "GroundingDINO_SwinT_OGC", **overrides: Any) -> Any:
    """A model config of the package (``GroundingDINO_SwinT_OGC``, ``GroundingDINO_SwinB_cfg``) as ``SLConfig``."""
    import importlib

    from groundingdino.util.slconfig import SLConfig

    base = importlib.import_module(f"groundingdino.config.{name}")
    values = {k: getattr(base, k) for k in dir(base) if not k.startswith("_")}
    values.update(use_checkpoint=False, use_transformer_ckpt=False)  # activation checkpointing: training only
    values.update(overrides)
    return SLConfig(values)


def build_groundingdino_py(config: Any, checkpoint: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Build ``groundingdino``'s model from a config (and load a checkpoint's weights) on transformers 5."""
    try:
        from groundingdino.models import build_model
    except ImportError as err:
        raise HifiError("Grounding DINO .pth checkpoints need the groundingdino-py package") from err
    config.device = "cpu"
    try:
        with _adapted(), contextlib.redirect_stdout(io.StringIO()):  # it prints the text encoder's name
            model = build_model(config)
    except (OSError, ValueError) as err:
        raise missing_model(GROUNDING_DINO_SLOT, str(config.text_encoder_type), f"its BERT: {first_line(err)}") from err
    if checkpoint is not None:
        state = {k.removeprefix("module."): v for k, v in checkpoint.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise HifiError(f"the checkpoint does not fit Grounding DINO: {len(missing)} weights missing,"
                            f" {len(unexpected)} unexpected")
    return model


@attrs.frozen(eq=False)
class GroundingDinoPy:
    """:class:`~hifi_backends.perception.grounding_dino.BoxDetector` over ``groundingdino-py``'s model."""

    model: Any
    box_threshold: float = 0.35
    side: int = DETECTOR_SIDE
    max_side: int = DETECTOR_MAX_SIDE

    def detect(self, images: Tensor, phrase: str) -> list[Detections]:
        param = next(self.model.parameters())
        query = detection_query(phrase)
        pixels = detector_pixels(images.to(param.device), self.side, self.max_side, IMAGENET_MEAN, IMAGENET_STD)
        with torch.no_grad():
            out = self.model(pixels.to(param.dtype), captions=[query] * images.shape[0])
        ids = torch.tensor(self.model.tokenizer(query).input_ids)
        words = ~torch.isin(ids, torch.tensor(list(self.model.specical_tokens)))
        return select_boxes(out["pred_logits"][..., : len(ids)], words, out["pred_boxes"], self.box_threshold, images)


def load_groundingdino_py(
    checkpoint: str, device: torch.device, *, text_encoder: str | None = None, config_name: str | None = None,
    box_threshold: float = 0.35,
) -> GroundingDinoPy:
    """An original Grounding DINO checkpoint (``.pth``); Swin-B configs are picked for ``*swinb*`` files."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise missing_model(GROUNDING_DINO_SLOT, checkpoint, "no such file")
    name = config_name or ("GroundingDINO_SwinB_cfg" if "swinb" in path.name.lower() else "GroundingDINO_SwinT_OGC")
    config = groundingdino_config(name, **({"text_encoder_type": text_encoder} if text_encoder else {}))
    model = build_groundingdino_py(config, load_state_dict(path))
    return GroundingDinoPy(place(model, device), box_threshold)
