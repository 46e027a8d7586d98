"""The DenoiserBackend protocol, the registry, and the backends built from configs."""

from __future__ import annotations

import pytest
import torch

from hifi import DenoiserBackend, HifiError, ModelNotFoundError, load_backend
from hifi.algorithms.sampling import ddim_invert, ddim_sample
from hifi.kernels.ddim import DdimGrid
from hifi.kernels.losses import masked_mse, resize_mask, splice_subject, subject_slots
from hifi.registry import available_backends, register_backend


def test_registry_lists_the_three_backends():
    assert {"tiny", "sd14", "sd14-fp16"} <= set(available_backends())


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(HifiError, match="unknown backend 'nope'.*tiny"):
        load_backend("nope")


def test_register_backend_at_run_time(tiny):
    register_backend("mine", lambda **_: tiny)
    assert load_backend("mine") is tiny
    assert "mine" in available_backends()


def test_tiny_implements_the_protocol(tiny):
    assert isinstance(tiny, DenoiserBackend)
    c = tiny.encode_text(["a photo of a dog", "a cat"])
    assert c.sequence.shape == (2, tiny.max_length, tiny.text_width) and c.extras == {}
    phi = tiny.null_embedding()
    assert phi.sequence.shape == (1, tiny.max_length, tiny.text_width) and phi.extras == {}
    x = torch.randn(2, tiny.latent_channels, 8, 8)
    with torch.no_grad():
        assert tiny.denoise(x, 500, c).shape == x.shape
        img = tiny.decode_latents(x)
        assert img.shape == (2, 3, tiny.resolution, tiny.resolution)
        assert tiny.encode_images(img).shape == x.shape
    assert tiny.attn_processors, "the UNet exposes its attention processors"


def test_tiny_is_reproducible_from_its_seed():
    a, b, c = (load_backend("tiny", seed=s) for s in (1, 1, 2))
    wa, wb, wc = (next(m.unet.parameters()) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_refuses_a_model():
    with pytest.raises(HifiError, match="drop --model"):
        load_backend("tiny", model="/some/where")


def test_the_weights_are_frozen(tiny):
    assert not any(p.requires_grad for p in tiny.unet.parameters())
    assert not any(p.requires_grad for p in tiny.text_encoder.parameters())


def test_token_embeddings_put_the_text_encoder_in_the_loop(tiny):
    """Classic Textual Inversion: a differentiable input embedding for a placeholder token."""
    tiny.add_placeholder_token("<hifi-test>")
    vector = tiny.input_embedding("dog").requires_grad_(True)
    plain = tiny.encode_text(["a photo of a dog"])
    swapped = tiny.encode_text(["a photo of a <hifi-test>"], token_embeddings={"<hifi-test>": vector})
    torch.testing.assert_close(swapped.sequence, plain.sequence)  # same vector as "dog" -> same encoding
    assert swapped.extras == {} and plain.extras == {}
    swapped.sequence.sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    with pytest.raises(HifiError, match="not a token"):
        tiny.encode_text(["x"], token_embeddings={"<never-added>": vector})


def test_gradient_reaches_c_s_through_the_unet(tiny):
    c = tiny.encode_text(["a photo of a dog"])
    c_s = subject_slots(tiny.null_embedding(), 5)[0].clone().requires_grad_(True)
    x = torch.randn(1, 4, 8, 8)
    out = tiny.denoise(x, 400, splice_subject(c, c_s))
    masked_mse(out, torch.randn_like(out), resize_mask(torch.ones(1, 32, 32), (8, 8))).backward()
    assert c_s.grad is not None and c_s.grad.abs().sum() > 0


def test_channels_last_unet_gives_the_same_noise_and_gradient(tiny):
    """The fast path's layout switch changes where numbers sit in memory, not the numbers."""
    c = tiny.encode_text(["a photo of a dog"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def forward_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        c_s = subject_slots(tiny.null_embedding(), 5)[0].clone().requires_grad_(True)
        out = tiny.denoise(x, 400, splice_subject(c, c_s))
        out.square().mean().backward()
        return out.detach(), c_s.grad

    out, grad = forward_and_grad()
    tiny.set_channels_last()
    assert tiny.channels_last and next(p for p in tiny.unet.parameters() if p.dim() == 4).is_contiguous(
        memory_format=torch.channels_last)
    out_cl, grad_cl = forward_and_grad()
    tiny.set_channels_last(False)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_cl, grad, rtol=1e-4, atol=1e-6)
    assert not torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("model", ["/definitely/not/here", "./missing-folder"])
def test_missing_stable_diffusion_folder_is_one_clear_line(model):
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        load_backend("sd14", model=model)
    assert "\n" not in str(info.value)


def test_no_model_at_all_names_the_flag(monkeypatch):
    monkeypatch.delenv("HIFI_SD_MODEL", raising=False)
    with pytest.raises(ModelNotFoundError, match="--model"):
        load_backend("sd14")


def test_offline_hub_id_is_one_clear_line(monkeypatch):
    """With the hub switched off, a hub id fails at once with a line naming what to supply."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HIFI_SD_MODEL"):
        load_backend("sd14", model="CompVis/stable-diffusion-v1-4")


def test_empty_local_folder_is_one_clear_line(tmp_path):
    with pytest.raises(ModelNotFoundError, match="could not load"):
        load_backend("sd14", model=str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "width", "prediction"), [("sd14", 768, "epsilon"), ("sd21", 1024, "v_prediction")]
)
def test_full_size_architectures_run_the_kernels(arch, width, prediction):
    """The real SD 1.4 / 2.1 architectures, random weights, 64x64 images, on the CPU."""
    from hifi_backends.stable_diffusion import build_random_architecture

    torch.set_num_threads(2)  # large matrices: threads pay here (conftest sets 1 for the tiny model)
    backend = build_random_architecture(arch, sample_size=8, device="cpu")
    assert isinstance(backend, DenoiserBackend)
    assert backend.text_width == width and backend.max_length == 77
    assert backend.schedule.prediction_type == prediction
    with torch.no_grad():
        c = backend.encode_text(["a photo of a dog"])
        c = splice_subject(c, subject_slots(backend.null_embedding(), 5)[0] + 0.1)
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        x0 = backend.encode_images(image)
        assert x0.shape == (1, 4, 8, 8)
        trajectory = ddim_invert(backend.denoise, DdimGrid.build(backend.schedule, 2), x0, c)
        x = ddim_sample(
            backend.denoise, DdimGrid.build(backend.schedule, 2), trajectory[-1], c,
            uncond=backend.null_embedding(), guidance=7.5)
        out = backend.decode_latents(x)
    assert out.shape == image.shape and torch.isfinite(out).all()


def test_a_device_this_machine_lacks_is_a_clear_error_before_any_loading():
    from hifi.errors import HifiError
    from hifi.registry import check_device, load_backend

    check_device("cpu")
    with pytest.raises(HifiError, match="unknown device 'gpu0'"):
        load_backend("tiny", device="gpu0")
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(HifiError, match=f"device '{missing}' was asked for"):
        load_backend("tiny", device=missing)
