"""The ``tiny`` backend: random tiny components built from configs, seeded, on the CPU.

Nothing is downloaded. It exists so that every algorithm runs end to end in seconds: the
test suite, CI and the examples use it. Its images are noise-like; it shows that the code
is right, not that the method works (ToyWorld's trained model does that).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from hifi.errors import HifiError
from hifi_backends.configs import load_config
from hifi_backends.diffusers_backend import DiffusersBackend
from hifi_backends.tokenizer import build_clip_tokenizer

TINY_MAX_LENGTH = 24
"""Text length L of the tiny model: room for a prompt and the 5 c_s slots at the end."""


def tiny_clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """The text towers of ``tiny-sdxl`` and ``tiny-sd3``: diffusers' own SDXL / SD 3 test sizes (32 wide, five
    layers, projected to 32), over ``tokenizer``'s vocabulary."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH, projection_dim=32, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def tiny_vae(**overrides: Any) -> AutoencoderKL:
    """A random tiny VAE for 32x32 images: 8x8x4 latents (drawn from the global generator); ``overrides`` go to
    its config (SD 3's ``shift_factor``, ``scaling_factor``, no quant convs)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **overrides,
    )


def build_tiny_backend(
    *, model: str | None = None, seed: int = 0, device: str | None = None
) -> DiffusersBackend:
    """Random tiny Stable-Diffusion-shaped components: 32x32 images, 8x8x4 latents, L = 24.

    ``seed`` fixes the weights, so two builds with the same seed are identical.
    """
    if model:
        raise HifiError("the tiny backend has random weights and loads no model; drop --model")
    tokenizer = build_clip_tokenizer(model_max_length=TINY_MAX_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = tiny_vae()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TINY_MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return DiffusersBackend(
        name="tiny",
        model_id=f"random:tiny:{seed}",
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=load_config("sd14", "scheduler"),
        device=device or "cpu",
    )
