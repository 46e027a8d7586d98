"""The shipped SD3 medium configs build the published architecture (meta device, no download)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from hifi_backends.configs import ARCHITECTURES, COMPONENTS, load_config

# Parameter counts of stabilityai/stable-diffusion-3-medium-diffusers' components, as
# NVIDIA's aitune inspect guide prints them for that pipeline loaded with its weights.
# The VAE total is the FLUX.1 VAE's published count (the same AutoencoderKL shape); the
# SD3 decoder alone is pinned by the aitune figure below.
PUBLISHED = {
    "transformer": 2_028_328_000,
    "vae": 83_819_683,
    "text_encoder": 123_650_304,
    "text_encoder_2": 694_659_840,
    "text_encoder_3": 4_762_310_656,
}
PUBLISHED_VAE_DECODER = 49_545_475
# keras-hub's stable_diffusion_3_medium preset counts CLIP-L + CLIP-G + MMDiT + VAE, with
# the MMDiT's fixed sin-cos position table as a weight (diffusers keeps it as a buffer).
KERAS_HUB_SD3_MEDIUM = 2_987_080_931

SD3_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler")


def _transformers_config(component: str) -> dict:
    """The transformers config less its class keys, as the backends build it."""
    return {k: v for k, v in load_config("sd3", component).items()
            if k not in ("architectures", "model_type")}


def _build(component: str) -> torch.nn.Module:
    with torch.device("meta"):
        if component == "transformer":
            return SD3Transformer2DModel.from_config(load_config("sd3", "transformer"))
        if component == "vae":
            return AutoencoderKL.from_config(load_config("sd3", "vae"))
        if component == "text_encoder_3":
            return T5EncoderModel(T5Config(**_transformers_config("text_encoder_3")))
        return CLIPTextModelWithProjection(CLIPTextConfig(**_transformers_config(component)))


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {component: _build(component) for component in PUBLISHED}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("component", sorted(PUBLISHED))
def test_parameter_count_matches_published(models, component):
    assert _count(models[component]) == PUBLISHED[component]


def test_vae_decoder_matches_published(models):
    assert _count(models["vae"].decoder) == PUBLISHED_VAE_DECODER


def test_keras_hub_total_is_the_sum_with_the_position_table(models):
    pos_embed = models["transformer"].pos_embed.pos_embed
    assert pos_embed.shape == (1, 192 * 192, 1536)
    total = sum(PUBLISHED[c] for c in ("transformer", "vae", "text_encoder", "text_encoder_2"))
    assert total + pos_embed.numel() == KERAS_HUB_SD3_MEDIUM


def test_transformer_takes_t5_states_and_both_pooled_clips(models):
    transformer = models["transformer"]
    t5_width = load_config("sd3", "text_encoder_3")["d_model"]
    pooled = sum(load_config("sd3", c)["projection_dim"] for c in ("text_encoder", "text_encoder_2"))
    assert transformer.context_embedder.in_features == t5_width == 4096
    assert transformer.time_text_embed.text_embedder.linear_1.in_features == pooled == 2048


def test_vae_has_sixteen_latent_channels_and_no_quant_convs(models):
    config = load_config("sd3", "vae")
    assert (config["latent_channels"], config["scaling_factor"], config["shift_factor"]) == (16, 1.5305, 0.0609)
    assert models["vae"].quant_conv is None and models["vae"].post_quant_conv is None


def test_text_configs_name_their_transformers_classes():
    for component in ("text_encoder", "text_encoder_2"):
        assert load_config("sd3", component)["architectures"] == ["CLIPTextModelWithProjection"]
        assert load_config("sd3", component)["model_type"] == "clip_text_model"
    assert load_config("sd3", "text_encoder_3")["architectures"] == ["T5EncoderModel"]
    assert load_config("sd3", "text_encoder_3")["model_type"] == "t5"


def test_scheduler_is_flow_match_euler_with_shift_three():
    config = load_config("sd3", "scheduler")
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    assert scheduler.config.shift == 3.0
    assert scheduler.config.num_train_timesteps == 1000


def test_no_provenance_keys_are_shipped():
    provenance = {"_diffusers_version", "_name_or_path", "torch_dtype", "transformers_version"}
    for component in SD3_COMPONENTS:
        assert not provenance & set(load_config("sd3", component))


def test_sd3_is_listed_with_its_components():
    assert "sd3" in ARCHITECTURES
    assert {"transformer", "text_encoder_3"} <= set(COMPONENTS)
    for component in SD3_COMPONENTS:
        assert isinstance(load_config("sd3", component), dict)


def test_sd3_has_no_unet():
    with pytest.raises(ValueError, match="no config"):
        load_config("sd3", "unet")


@pytest.mark.parametrize("architecture", ["sd14", "sd21", "sdxl"])
@pytest.mark.parametrize("component", ["transformer", "text_encoder_3"])
def test_sd3_components_are_sd3_only(architecture, component):
    with pytest.raises(ValueError, match="no config"):
        load_config(architecture, component)
