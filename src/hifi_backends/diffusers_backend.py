"""One implementation of :class:`hifi.protocols.DenoiserBackend` over diffusers components.

Every backend in this package is this class, fed differently: random tiny components
(``tiny``, ``tiny-sdxl``, ``tiny-sd3``), a Stable Diffusion folder (``sd14``, ``sdxl``, ``sd3``),
or the same in half precision (``sd14-fp16``, ``sdxl-fp16``, ``sd3-fp16``). It adapts the
components' interfaces and holds no algorithm.

Three text stacks, told apart by the components given:

- SD 1.x / 2.x: one CLIP text encoder; the condition is its last (layer-normed) hidden
  state, with no extras.
- SDXL: two (CLIP ViT-L and OpenCLIP ViT-bigG with a projection); the sequence is their
  penultimate hidden states side by side ``[B, 77, 768 + 1280]``, and the extras are the
  second encoder's pooled, projected embedding (``text_embeds``) and the size/crop
  conditioning ``time_ids`` = (H, W, 0, 0, H, W) at the backend's resolution, as
  ``StableDiffusionXLPipeline`` computes them by default. phi is all zeros (sequence and
  pooled part) when the model says so (``force_zeros_for_empty_prompt``, SDXL base's
  default, which its pipeline uses as the negative condition): SDXL was trained to drop
  its text condition that way, so zeros are its unconditional input; else the encoded
  empty prompt.
- SD 3 (an ``SD3Transformer2DModel`` in place of the UNet): the two CLIP encoders'
  penultimate layers side by side, padded to the transformer's joint width, then the T5
  part (T5's output, or zeros without T5, as its pipeline does); the extra is both CLIPs'
  projected embeddings (``pooled_projections``); phi is the encoded empty prompt.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from hifi.errors import HifiError
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import Schedule

WORD = re.compile(r"[^\W\d_]+")
"""A word as CLIP's pre-tokenizer splits one off: a run of letters."""

OPEN_VOCABULARY = 10_000
"""A tokenizer of at least this many entries (CLIP's has 49,408) spells any word from
sub-words it learned, so only its unknown token marks a word it does not know. A smaller
one is a word list (the ``tiny`` and ``toy`` backends', :mod:`hifi_backends.tokenizer`): its
words are single tokens, and any other word falls apart into pieces the model never saw."""


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The UNet modules LoRA adapts: every attention's projections, as diffusers' train_dreambooth_lora does."""

LORA_PREFIX = "unet"
"""The key prefix of the UNet's adapters in a ``load_lora_weights`` file (``StableDiffusionPipeline.unet_name``)."""
SD3_LORA_PREFIX = "transformer"
"""The same for SD 3's transformer (``StableDiffusion3Pipeline.transformer_name``)."""


class DiffusersBackend:
    """A latent diffusion model: a UNet (or SD 3's transformer), a VAE, CLIP text encoders (and T5) with tokenizers.

    All weights are frozen (``requires_grad=False``) and in eval mode; an algorithm that
    fine-tunes the denoiser switches its parameters on through :meth:`trainable_parameters`
    (or, for LoRA adapters from :meth:`add_lora`, :meth:`lora_parameters`).
    """

    def __init__(
        self,
        *,
        name: str,
        model_id: str,
        unet: UNet2DConditionModel | None = None,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler_config: Mapping[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        resolution: int | None = None,
        perception_defaults: Mapping[str, str] | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        force_zeros_for_empty_prompt: bool = False,
        transformer: SD3Transformer2DModel | None = None,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3: Any = None,
        t5_length: int = 256,
    ) -> None:
        self.name = name
        self.model_id = model_id
        if (unet is None) == (transformer is None):
            raise HifiError(f"model {model_id!r}: give one denoiser, a UNet or an SD3 transformer")
        self.unet, self.transformer = unet, transformer
        denoiser = unet if unet is not None else transformer
        assert denoiser is not None
        self.denoiser: Any = denoiser
        """The denoiser module: the UNet (SD 1.x, 2.x, XL) or the MMDiT transformer (SD 3)."""
        self.lora_prefix = LORA_PREFIX if unet is not None else SD3_LORA_PREFIX
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise HifiError(f"model {model_id!r}: a second text encoder needs its tokenizer, and the reverse")
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self._encoders: list[tuple[CLIPTokenizer, CLIPTextModel]] = [(tokenizer, text_encoder)]
        if text_encoder_2 is not None and tokenizer_2 is not None:
            self._encoders.append((tokenizer_2, text_encoder_2))
        self.text_encoder_3, self.tokenizer_3, self.t5_length = text_encoder_3, tokenizer_3, t5_length
        self.text_time = unet is not None and unet.config.get("addition_embed_type") == "text_time"
        """Whether the UNet reads SDXL's pooled embedding and time ids (``added_cond_kwargs``)."""
        if (self.text_time or transformer is not None) and text_encoder_2 is None:
            raise HifiError(f"model {model_id!r}: its denoiser reads a pooled text embedding, so it needs"
                            " text_encoder_2")
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.scheduler_config = dict(scheduler_config)
        try:
            self.schedule = Schedule.from_config(self.scheduler_config)
        except ValueError as err:  # a model whose scheduler the DDIM kernels cannot follow
            raise HifiError(f"model {model_id!r}: its scheduler config is not usable here: {err}") from err
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        config = self.denoiser.config
        self.latent_channels = int(config.in_channels)
        self.resolution = resolution or int(config.sample_size) * self.vae_scale_factor
        self.clip_length = int(tokenizer.model_max_length)
        """The CLIP tokenizers' length; the sequence is that long, or on SD 3 that plus the T5 part's length."""
        self.max_length = self.clip_length + (t5_length if transformer is not None else 0)
        clip_width = sum(int(encoder.config.hidden_size) for _, encoder in self._encoders)
        self.text_width = int(config.joint_attention_dim) if transformer is not None else clip_width
        self._scaling = float(vae.config.scaling_factor)
        self._shift = float(vae.config.get("shift_factor") or 0.0)
        """SD 3's VAE latents are shifted before scaling: ``(z - shift) * scale``."""
        self._device = torch.device(device)
        self._dtype = dtype
        self._vae_dtype = torch.float32 if dtype == torch.float16 and vae.config.get("force_upcast") else dtype
        """SDXL's VAE overflows in fp16 (its config says ``force_upcast``): float32 then, as in its pipeline."""
        extra = (text_encoder_3,) if text_encoder_3 is not None else ()
        for module in (self.denoiser, vae, *(encoder for _, encoder in self._encoders), *extra):
            module.requires_grad_(False)
            module.eval()
            module.to(self._device)
            wanted = self._vae_dtype if module is vae else dtype
            if next(module.parameters()).dtype != wanted:
                module.to(dtype=wanted)
        self._phi: Condition | None = None
        self.channels_last = False
        """Whether the UNet's weights are held channels-last (:meth:`set_channels_last`)."""
        self.perception_defaults = dict(perception_defaults or {})
        """Perception models that suit this model (``segmenter``, ``embedder``, ``clip``), by registry name."""

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def __repr__(self) -> str:
        return (
            f"DiffusersBackend(name={self.name!r}, model_id={self.model_id!r},"
            f" device={self._device}, dtype={self._dtype})"
        )

    # Text -----------------------------------------------------------------------------
    def token_ids(self, prompts: Sequence[str]) -> Tensor:
        """Token ids ``[B, L]``, padded to the text encoder's full length as SD does (on SD 3, the CLIP
        tokens and then, for the T5 part's positions, the CLIP padding id: no word sits there)."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.clip_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        if self.max_length > self.clip_length:
            pad = torch.full((ids.shape[0], self.max_length - self.clip_length), int(self.tokenizer.pad_token_id))
            ids = torch.cat([ids, pad], dim=1)
        return ids.to(self._device)

    def unknown_words(self, prompts: Sequence[str]) -> tuple[str, ...]:
        """The words of ``prompts`` the tokenizer does not know (:class:`hifi.protocols.denoiser.VocabularyBackend`).

        Unknown: a word that maps to the unknown token or, in a word-list vocabulary (under
        :data:`OPEN_VOCABULARY` entries), one that is not a single token. Added tokens (a
        Textual Inversion placeholder) are known.
        """
        added = sorted(self.tokenizer.get_added_vocab(), key=len, reverse=True)
        words: dict[str, None] = {}
        for prompt in prompts:
            for token in added:
                prompt = prompt.replace(token, " ")
            words.update(dict.fromkeys(w.lower() for w in WORD.findall(prompt)))
        word_list = len(self.tokenizer) < OPEN_VOCABULARY
        unknown = []
        for word in words:
            ids = self.tokenizer(word, add_special_tokens=False).input_ids
            if self.tokenizer.unk_token_id in ids or (word_list and len(ids) != 1):
                unknown.append(word)
        return tuple(unknown)

    def prompt_lengths(self, prompts: Sequence[str]) -> tuple[int, ...]:
        """Each prompt's token count without the start and end tokens, untruncated."""
        ids = self.tokenizer(list(prompts), add_special_tokens=False, verbose=False).input_ids
        return tuple(len(row) for row in ids)

    @property
    def input_widths(self) -> tuple[int, ...]:
        """Each text encoder's input-embedding width: a Textual Inversion vector is these parts in order."""
        return tuple(int(encoder.get_input_embeddings().weight.shape[1]) for _, encoder in self._encoders)

    def add_placeholder_token(self, word: str) -> int:
        """Add ``word`` as a new token to every tokenizer (classic Textual Inversion); its id in the first."""
        if self.text_encoder_3 is not None:
            raise HifiError("classic Textual Inversion on SD 3 with its T5 encoder is not supported (T5 would read the"
                            " token as text); tune in hifi or dreambooth mode, or load the model without T5")
        for tokenizer, encoder in self._encoders:
            if tokenizer.add_tokens([word]) > 0:
                encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
                encoder.requires_grad_(False)
        return int(self.tokenizer.convert_tokens_to_ids(word))

    def input_embedding(self, word: str) -> Tensor:
        """The input embedding of a word that is a single token: every text encoder's row, concatenated."""
        rows = []
        for tokenizer, encoder in self._encoders:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise HifiError(f"{word!r} is {len(ids)} tokens for this tokenizer, not one")
            rows.append(encoder.get_input_embeddings().weight[ids[0]].detach().clone())
        return torch.cat(rows)

    def encode_text(
        self, prompts: Sequence[str], token_embeddings: Mapping[str, Tensor] | None = None
    ) -> Condition:
        sequences, pools = [], []
        offset = 0
        for (tokenizer, encoder), width in zip(self._encoders, self.input_widths, strict=True):
            ids = tokenizer(
                list(prompts), padding="max_length", max_length=self.clip_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self._device)
            parts = {word: vector[offset : offset + width] for word, vector in (token_embeddings or {}).items()}
            offset += width
            out = self._run_encoder(tokenizer, encoder, ids, parts)
            if self.text_encoder_2 is None:
                sequences.append(out[0])  # SD 1.x/2.x: the last hidden state, layer-normed
            else:
                sequences.append(out.hidden_states[-2])  # SDXL and SD 3: the penultimate layer of each
                if isinstance(encoder, CLIPTextModelWithProjection):
                    pools.append(out.text_embeds)
        sequence = torch.cat(sequences, dim=-1) if len(sequences) > 1 else sequences[0]
        if self.transformer is None:
            return Condition(sequence, self._extras(pools[-1] if pools else None, len(prompts)))
        # SD 3: the CLIP part padded to the joint width, then T5's part; the pooled part is both CLIPs'.
        clip = torch.nn.functional.pad(sequence, (0, self.text_width - sequence.shape[-1]))
        return Condition(torch.cat([clip, self._t5(prompts).to(clip.dtype)], dim=-2),
                         {"pooled_projections": torch.cat(pools, dim=-1)})

    def _t5(self, prompts: Sequence[str]) -> Tensor:
        """SD 3's T5 part ``[B, t5_length, D]``: T5's output, or zeros without T5 (as its pipeline does)."""
        if self.text_encoder_3 is None:
            return torch.zeros(len(prompts), self.t5_length, self.text_width, device=self._device, dtype=self._dtype)
        ids = self.tokenizer_3(list(prompts), padding="max_length", max_length=self.t5_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids.to(self._device)
        return self.text_encoder_3(ids)[0]

    def _extras(self, pooled: Tensor | None, batch: int) -> dict[str, Tensor]:
        """SDXL's added conditions: the pooled embedding and the default size/crop ids at this resolution."""
        if not self.text_time:
            return {}
        assert pooled is not None, "an SDXL UNet needs the second text encoder's pooled embedding"
        side = float(self.resolution)
        time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]], device=self._device, dtype=pooled.dtype)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(batch, -1)}

    def _run_encoder(
        self, tokenizer: CLIPTokenizer, encoder: CLIPTextModel, ids: Tensor, token_embeddings: Mapping[str, Tensor]
    ) -> Any:
        hidden = self.text_encoder_2 is not None
        if not token_embeddings:
            return encoder(ids, output_hidden_states=hidden)
        replacements = []
        for word, vector in token_embeddings.items():
            token_id = tokenizer.convert_tokens_to_ids(word)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise HifiError(f"{word!r} is not a token; call add_placeholder_token first")
            replacements.append((token_id, vector))

        # The seam for a differentiable token embedding is the embedding layer's output:
        # a forward hook swaps in the vectors for the placeholder positions, so the text
        # encoder runs unmodified and gradients reach the vectors.
        def swap(_module: torch.nn.Module, _inputs: Any, output: Tensor) -> Tensor:
            for token_id, vector in replacements:
                hit = (ids == token_id).unsqueeze(-1)
                output = torch.where(hit, vector.to(output.dtype), output)
            return output

        handle = encoder.get_input_embeddings().register_forward_hook(swap)
        try:
            return encoder(ids, output_hidden_states=hidden)
        finally:
            handle.remove()

    def null_embedding(self) -> Condition:
        if self._phi is None:
            with torch.no_grad():
                empty = self.encode_text([""])
            if self.force_zeros_for_empty_prompt:
                zero = {k: torch.zeros_like(v) for k, v in empty.extras.items() if k == "text_embeds"}
                empty = Condition(torch.zeros_like(empty.sequence), {**empty.extras, **zero})
            self._phi = empty
        return self._phi

    # Denoiser -------------------------------------------------------------------------
    def denoise(self, x_t: Tensor, t: int | float | Tensor, cond: Condition) -> Tensor:
        cond = cond.expand(x_t.shape[0])
        timestep = torch.as_tensor(t, device=x_t.device)
        if self.transformer is not None:  # SD 3: a timestep per sample, the pooled embedding as its own input
            return self.transformer(hidden_states=x_t, timestep=timestep.expand(x_t.shape[0]),
                                    encoder_hidden_states=cond.sequence, **cond.extras).sample
        added = dict(cond.extras) if cond.extras else None
        assert self.unet is not None
        return self.unet(x_t, timestep, encoder_hidden_states=cond.sequence, added_cond_kwargs=added).sample

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Recompute the UNet's block activations in the backward pass (DreamBooth on less memory)."""
        if on:
            self.denoiser.enable_gradient_checkpointing()
        else:
            self.denoiser.disable_gradient_checkpointing()

    def set_channels_last(self, on: bool = True) -> None:
        """Hold the UNet's weights channels-last (NHWC) or back in the default layout.

        Convolutions take the layout of their weights, so every activation inside the UNet
        follows; on a GPU, cuDNN then runs half-precision convolutions without transposing
        around each one. Numbers stay the same up to floating-point reordering; speed is
        measured in ``benchmarks/`` (the ``--memory-format`` rows).
        """
        self.denoiser.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        self.channels_last = on

    @property
    def attn_processors(self) -> dict[str, Any]:
        return dict(self.denoiser.attn_processors)

    def set_attn_processor(self, processors: Mapping[str, Any] | Any) -> None:
        self.denoiser.set_attn_processor(dict(processors) if isinstance(processors, Mapping) else processors)

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.denoiser.parameters()

    def denoiser_state(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.denoiser.state_dict().items()}

    def load_denoiser_state(self, state: Mapping[str, Tensor]) -> None:
        missing, unexpected = self.denoiser.load_state_dict(dict(state), strict=False)
        if missing or unexpected:
            raise HifiError(
                f"denoiser weights do not fit this backend ({len(missing)} missing,"
                f" {len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[:3]})"
            )

    # LoRA (:class:`hifi.protocols.denoiser.LoraBackend`) -----------------------------------
    def add_lora(self, rank: int, seed: int) -> None:
        """Fresh peft adapters of rank ``rank`` (alpha = rank, gaussian A, zero B) on :data:`LORA_TARGETS`.

        They are held in float32 whatever the UNet's precision, as diffusers' example trains them.
        """
        self.remove_lora()
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), init_lora_weights="gaussian")
        with torch.random.fork_rng(devices=[]):  # peft draws A on the CPU from the global generator
            torch.manual_seed(seed)
            self.denoiser.add_adapter(config)
        for p in self.lora_parameters():
            p.data = p.data.float()
        self._freeze_lora()

    def lora_parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for name, p in self.denoiser.named_parameters() if ".lora_" in name)

    def lora_state(self) -> dict[str, Tensor]:
        adapters = list(getattr(self.denoiser, "peft_config", {}))
        if not adapters:
            raise HifiError("the denoiser carries no LoRA")
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.denoiser, adapter_name=adapters[0]))
        return {f"{self.lora_prefix}.{k}": v.detach() for k, v in state.items()}

    def load_lora_state(self, state: Mapping[str, Tensor]) -> None:
        self.remove_lora()
        if not any(k.startswith(f"{self.lora_prefix}.") for k in state):
            raise HifiError(f"the LoRA weights hold no {self.lora_prefix}.* keys: not a LoRA of this denoiser")
        try:
            self.denoiser.load_lora_adapter(dict(state), prefix=self.lora_prefix)
        except (ValueError, RuntimeError) as err:
            self.remove_lora()
            detail = str(err).strip().splitlines()[-1].strip()  # torch's last line: one mismatch, named
            raise HifiError(f"the LoRA weights do not fit this backend's UNet ({detail})") from err
        self._freeze_lora()

    def remove_lora(self) -> None:
        if hasattr(self.denoiser, "peft_config"):  # empty after a failed load, which may leave adapter layers
            self.denoiser.unload_lora()

    def _freeze_lora(self) -> None:
        """Adapters frozen like every other weight here: a tune switches on what it trains."""
        for p in self.lora_parameters():
            p.requires_grad_(False)

    # VAE ------------------------------------------------------------------------------
    def encode_images(self, images: Tensor) -> Tensor:
        images = images.to(device=self._device, dtype=self._vae_dtype)
        return ((self.vae.encode(images).latent_dist.mean - self._shift) * self._scaling).to(self._dtype)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents.to(self._vae_dtype) / self._scaling + self._shift).sample
