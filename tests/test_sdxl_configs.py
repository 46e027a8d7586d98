"""The shipped SDXL base 1.0 configs build the published architecture (meta device, no download)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from hifi_backends.configs import ARCHITECTURES, COMPONENTS, load_config

# Parameter counts of stabilityai/stable-diffusion-xl-base-1.0's components.
PUBLISHED = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def _text_config(component: str) -> CLIPTextConfig:
    """As stable_diffusion.py builds it: the transformers config less its class keys."""
    config = load_config("sdxl", component)
    return CLIPTextConfig(**{k: v for k, v in config.items()
                             if k not in ("architectures", "model_type")})


def _build(component: str) -> torch.nn.Module:
    with torch.device("meta"):
        if component == "unet":
            return UNet2DConditionModel.from_config(load_config("sdxl", "unet"))
        if component == "vae":
            return AutoencoderKL.from_config(load_config("sdxl", "vae"))
        if component == "text_encoder":
            return CLIPTextModel(_text_config("text_encoder"))
        return CLIPTextModelWithProjection(_text_config("text_encoder_2"))


@pytest.mark.parametrize("component", sorted(PUBLISHED))
def test_parameter_count_matches_published(component):
    model = _build(component)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[component]


def test_add_embedding_takes_time_ids_and_pooled_text():
    unet = _build("unet")
    time_dim = load_config("sdxl", "unet")["addition_time_embed_dim"]
    pooled_dim = load_config("sdxl", "text_encoder_2")["projection_dim"]
    assert unet.add_embedding.linear_1.in_features == 6 * time_dim + pooled_dim == 2816


def test_text_configs_name_their_transformers_classes():
    assert load_config("sdxl", "text_encoder")["architectures"] == ["CLIPTextModel"]
    assert load_config("sdxl", "text_encoder_2")["architectures"] == ["CLIPTextModelWithProjection"]


def test_scheduler_is_the_base_models_euler():
    config = load_config("sdxl", "scheduler")
    assert config["_class_name"] == "EulerDiscreteScheduler"
    scheduler = EulerDiscreteScheduler.from_config(config)
    assert scheduler.config.timestep_spacing == "leading"
    assert scheduler.config.steps_offset == 1


def test_every_architecture_has_the_base_components():
    assert "sdxl" in ARCHITECTURES and "text_encoder_2" in COMPONENTS
    for architecture in ("sd14", "sd21", "sdxl"):  # the UNet architectures (sd3 has a transformer)
        for component in ("unet", "vae", "text_encoder", "scheduler"):
            assert isinstance(load_config(architecture, component), dict)


@pytest.mark.parametrize("architecture", ["sd14", "sd21"])
def test_text_encoder_2_is_sdxl_only(architecture):
    with pytest.raises(ValueError, match="no config"):
        load_config(architecture, "text_encoder_2")


@pytest.mark.parametrize(("architecture", "component"), [("sdxl", "tokenizer"), ("sd3", "unet")])
def test_unknown_combination_raises(architecture, component):
    with pytest.raises(ValueError, match="no config"):
        load_config(architecture, component)
