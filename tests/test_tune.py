"""Learning the subject (Section 3.2, Algorithm 1), its run folder, resume, and bad input."""

from __future__ import annotations

import json

import attrs
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from hifi import HifiError, load_backend
from hifi.algorithms.generate import generate, initial_noise
from hifi.algorithms.subject import PLACEHOLDER, Subject
from hifi.algorithms.tune import TuneConfig, caption_for, tune
from hifi.cli import main
from hifi.io.diffusers_compat import pipeline_inputs
from hifi.io.runs import FolderCheckpointer, RunMeta, apply_run, check_compatible, load_run
from hifi.io.synthetic import draw_subject_photos
from hifi.kernels.ddim import add_noise, ddim_timesteps
from hifi.kernels.losses import masked_mse, resize_mask, splice_subject, subject_slots

FAST = {"steps": 12, "stepwise_steps": 2, "num_steps": 4}


@pytest.fixture(scope="module")
def photos():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    masks = torch.zeros(3, 32, 32)
    masks[:, 8:24, 6:22] = 1
    return images, masks


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_loss_falls_on_a_fixed_problem(tiny, photos):
    """Eq. 6 on fixed draws of (t, eps): lower after tuning c_s than at its start phi_s."""
    images, masks = photos
    with torch.no_grad():
        x0 = tiny.encode_images(images)
        c = tiny.encode_text([caption_for("hifi", "dog")])
    m = resize_mask(masks, (8, 8))
    g = torch.Generator().manual_seed(1)
    ts = torch.randint(100, 900, (3,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = add_noise(x0, eps, tuple(v.float() for v in tiny.schedule.levels(ts)))

    def loss(c_s):
        with torch.no_grad():
            return masked_mse(tiny.denoise(x_t, ts, splice_subject(c, c_s)), eps, m).item()

    result = tune(tiny, images, "dog", masks=masks, config=TuneConfig(steps=60, lr=2e-2, stepwise_steps=0))
    start = subject_slots(tiny.null_embedding(), 5)[0]
    before, after = loss(start), loss(result.subject.c_s)
    print(f"fixed-problem loss: {before:.4f} -> {after:.4f}")
    assert after < before * 0.985  # measured 1.2656 -> 1.2287 (-2.9%) on the random tiny UNet


def test_gradients_reach_c_s_and_nothing_else(tiny, photos):
    images, masks = photos
    unet, text = _state(tiny.unet), _state(tiny.text_encoder)
    result = tune(tiny, images, "dog", masks=masks, config=TuneConfig(**FAST))
    start = subject_slots(tiny.null_embedding(), 5)[0]
    assert not torch.equal(result.subject.c_s, start), "c_s moved"
    for module, before in ((tiny.unet, unet), (tiny.text_encoder, text)):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
        assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_each_stepwise_embedding_starts_from_its_neighbour(tiny, photos):
    """With one Adam step per timestep each c_s^t moves at most lr from c_s^(t+1) (its start),
    while the chain as a whole drifts further from c_s than one step could."""
    images, masks = photos
    lr = 1e-2
    cfg = TuneConfig(steps=3, lr=lr, stepwise_steps=1, num_steps=6)
    result = tune(tiny, images, "dog", masks=masks, config=cfg).subject
    chain = [result.c_s] + [result.stepwise[t] for t in ddim_timesteps(tiny.schedule, 6)]
    steps = [(b - a).abs().max().item() for a, b in zip(chain, chain[1:], strict=False)]
    assert max(steps) <= lr * 1.001
    assert (chain[-1] - result.c_s).abs().max().item() > lr * 1.5


@pytest.mark.parametrize(("mode", "kill_at"), [("hifi", 7), ("hifi", 13), ("classic-ti", 9)])
def test_resume_equals_an_uninterrupted_run(tiny, photos, tmp_path, mode, kill_at):
    """Killed in the global stage (after the step-4 checkpoint) or in the step-wise stage."""
    images, masks = photos
    cfg = TuneConfig(mode=mode, steps=10, stepwise_steps=2, num_steps=3, checkpoint_every=4)
    whole = tune(tiny, images, "dog", masks=masks, config=cfg)

    class Killed(Exception):
        pass

    seen = []

    def kill(stage, step, loss):
        seen.append(stage)
        if len(seen) == kill_at:
            raise Killed

    checkpointer = FolderCheckpointer(tmp_path / "checkpoint")
    with pytest.raises(Killed):
        tune(tiny, images, "dog", masks=masks, config=cfg, checkpointer=checkpointer, on_step=kill)
    assert checkpointer.load() is not None
    resumed = tune(tiny, images, "dog", masks=masks, config=cfg, checkpointer=checkpointer)
    assert resumed.losses == whole.losses
    if mode == "hifi":
        assert torch.equal(resumed.subject.c_s, whole.subject.c_s)
        assert all(torch.equal(resumed.subject.stepwise[t], v) for t, v in whole.subject.stepwise.items())
    else:
        assert torch.equal(resumed.subject.token_vector, whole.subject.token_vector)
    with pytest.raises(HifiError, match="other settings"):
        tune(tiny, images, "dog", masks=masks, config=TuneConfig(steps=11), checkpointer=checkpointer)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(photos, tmp_path):
    backend = load_backend("tiny", seed=0)
    images, masks = photos
    real = backend.denoise
    calls = []

    def poisoned(x, t, c):  # a test double: the sixth call returns NaN
        calls.append(1)
        out = real(x, t, c)
        return out * float("nan") if len(calls) == 6 else out

    backend.denoise = poisoned
    checkpointer = FolderCheckpointer(tmp_path / "checkpoint")
    with pytest.raises(HifiError, match="nan at global step 5"):
        tune(backend, images, "dog", masks=masks, config=TuneConfig(steps=10, checkpoint_every=2),
             checkpointer=checkpointer)
    state = checkpointer.load()
    assert state["step"] == 4 and torch.isfinite(state["c_s"]).all()


def test_stock_diffusers_pipeline_gives_the_same_image(tiny):
    n = 5
    g = torch.Generator().manual_seed(2)
    grid = ddim_timesteps(tiny.schedule, n)
    subject = Subject(class_name="dog", c_s=torch.randn(5, 32, generator=g),
                      stepwise={t: torch.randn(5, 32, generator=g) for t in grid})
    ours = generate(tiny, subject, "a <subject> on the beach", [7], num_steps=n)
    pipe = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=DDIMScheduler.from_config(tiny.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(num_inference_steps=n, guidance_scale=7.5, latents=initial_noise(tiny, [7]), output_type="latent",
                 **pipeline_inputs(tiny, subject, "a <subject> on the beach", n)).images
    torch.testing.assert_close(stock, ours.latents, rtol=1e-4, atol=1e-4)
    plain = generate(tiny, Subject(class_name="dog", c_s=subject.c_s), "a dog on the beach", [7], num_steps=n)
    assert not torch.allclose(plain.latents, ours.latents, atol=1e-3), "the step-wise swap matters"


def _tune_cli(tmp_path, *extra, photos_dir=None, masks=None):
    if photos_dir is None:
        photos_dir, masks = draw_subject_photos(tmp_path)
    argv = ["tune", "--subject", str(photos_dir), "--class-name", "dog", "--out", str(tmp_path / "run"),
            "--steps", "6", "--stepwise-steps", "1", "--ddim-steps", "3", "--samples", "1", "--quiet"]
    if masks is not None:
        argv += ["--masks", str(masks)]
    return main(argv + list(extra))


def test_tune_command_writes_a_documented_run(tmp_path, capsys):
    assert _tune_cli(tmp_path) == 0
    run_dir = tmp_path / "run"
    for name in ("run.json", "subject.safetensors", "losses.jsonl", "samples/grid.png", "samples/seed0.png",
                 "masks/photo0.png", "sources/photo2.png"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "checkpoint").exists()
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["backend"] == "tiny" and meta["masks"] == "folder" and meta["num_tokens"] == 5
    assert meta["config"]["steps"] == 6 and meta["config"]["lr"] == 5e-3
    assert meta["peak_memory"]["device"] == "cpu" and meta["peak_memory"]["peak_mb"] > 0
    assert len((run_dir / "losses.jsonl").read_text().splitlines()) == 6 + 3
    run = load_run(run_dir)
    assert run.subject.c_s.shape == (5, 32) and len(run.subject.stepwise) == 3
    from safetensors import safe_open

    with safe_open(str(run_dir / "subject.safetensors"), "pt") as f:
        assert f.metadata()["class_name"] == "dog" and f.metadata()["model_id"] == "random:tiny:0"
    assert _tune_cli(tmp_path) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_run_refuses_an_incompatible_backend(tmp_path, tiny):
    assert _tune_cli(tmp_path) == 0
    run = load_run(tmp_path / "run")
    check_compatible(run.meta, tiny)
    wide = RunMeta(**{**run.meta.to_json(), "text_width": 768, "sources": tuple(run.meta.sources)})
    with pytest.raises(HifiError, match="text width 768 vs 32"):
        check_compatible(wide, tiny)
    other = RunMeta(**{**run.meta.to_json(), "schedule": {**run.meta.schedule, "prediction_type": "v_prediction"},
                       "sources": tuple(run.meta.sources)})
    with pytest.raises(HifiError, match="prediction_type"):
        apply_run(load_run(tmp_path / "run").__class__(path=run.path, meta=other, subject=run.subject), tiny)


def test_classic_ti_embeds_load_into_diffusers(tmp_path):
    assert _tune_cli(tmp_path, "--mode", "classic-ti") == 0
    run = load_run(tmp_path / "run")
    backend = load_backend("tiny", seed=0)
    pipe = StableDiffusionPipeline(
        vae=backend.vae, text_encoder=backend.text_encoder, tokenizer=backend.tokenizer, unet=backend.unet,
        scheduler=DDIMScheduler.from_config(backend.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_textual_inversion(str(tmp_path / "run" / "learned_embeds.safetensors"))
    token_id = pipe.tokenizer.convert_tokens_to_ids(PLACEHOLDER)
    row = pipe.text_encoder.get_input_embeddings().weight[token_id]
    torch.testing.assert_close(row, run.subject.token_vector)


def test_dreambooth_mode_saves_weights_that_load(tmp_path):
    assert _tune_cli(tmp_path, "--mode", "dreambooth", "--lr", "1e-3", "--prior-preservation",
                     "--class-images", "1") == 0
    fresh = load_backend("tiny", seed=0)
    before = _state(fresh.unet)
    subject = apply_run(load_run(tmp_path / "run"), fresh)
    assert subject.mode == "dreambooth"
    changed = [k for k, v in fresh.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the fine-tuned weights were loaded"
    assert subject.render_prompt("a dog on the beach") == "a sks dog on the beach"


def test_bad_inputs_give_clear_messages(tmp_path, capsys):
    def err(*args, **kwargs):
        assert _tune_cli(tmp_path, *args, **kwargs) == 2
        return capsys.readouterr().err.strip()

    assert "is not a folder" in err(photos_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "holds no images" in err(photos_dir=tmp_path / "empty")
    photos, masks = draw_subject_photos(tmp_path / "a")
    (masks / "photo1.png").unlink()
    assert "no mask for photo1" in err(photos_dir=photos, masks=masks)
    photos, masks = draw_subject_photos(tmp_path / "b", n=3)
    Image.new("L", (10, 10)).save(masks / "extra.png")
    assert "masks without a photo: extra" in err(photos_dir=photos, masks=masks)
    photos, masks = draw_subject_photos(tmp_path / "c")
    (photos / "broken.jpg").write_bytes(b"not an image at all")
    assert "cannot read" in err(photos_dir=photos, masks="none")
    photos, masks = draw_subject_photos(tmp_path / "d")
    Image.new("L", (80, 60), 0).save(masks / "photo0.png")
    assert "photo0.png is empty" in err(photos_dir=photos, masks=masks)
    assert "--masks auto needs Grounded SAM: set HIFI_GROUNDING_DINO_MODEL" in err(photos_dir=photos, masks="auto")
    assert "--steps must be >= 0" in err("--steps", "-1")
    for line in capsys.readouterr().err.splitlines():
        assert "Traceback" not in line


def test_a_mask_of_another_size_is_resized_with_a_warning(tmp_path, capsys):
    photos, masks = draw_subject_photos(tmp_path)
    Image.open(masks / "photo0.png").resize((40, 30)).save(masks / "photo0.png")
    assert _tune_cli(tmp_path, photos_dir=photos, masks=masks) == 0
    assert "mask photo0.png is 40x30, its photo 80x60: resized" in capsys.readouterr().err


def test_non_writable_output_is_a_clear_error(tmp_path, capsys):
    photos, masks = draw_subject_photos(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run folder's parent should be")
    argv = ["tune", "--subject", str(photos), "--class-name", "dog", "--out", str(blocker / "run"), "--quiet"]
    assert main(argv) == 2
    assert "cannot write to" in capsys.readouterr().err


def test_masks_auto_runs_grounded_sam(tmp_path, monkeypatch):
    """--masks auto with Grounded SAM configured (tiny random models: the masks are arbitrary)."""
    monkeypatch.setenv("HIFI_GROUNDING_DINO_MODEL", "random:tiny")
    monkeypatch.setenv("HIFI_SAM_MODEL", "random:tiny")
    photos, _ = draw_subject_photos(tmp_path)
    assert _tune_cli(tmp_path, photos_dir=photos, masks="auto") == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["masks"] == "auto"
    assert len(list((tmp_path / "run" / "masks").glob("*.png"))) == 3


def test_dreambooth_with_gradient_checkpointing_learns_the_same_denoiser(tiny):
    g = torch.Generator().manual_seed(4)
    images = torch.rand(3, 3, tiny.resolution, tiny.resolution, generator=g) * 2 - 1
    config = TuneConfig(mode="dreambooth", steps=3)
    start = {k: v.clone() for k, v in tiny.denoiser_state().items()}
    try:
        plain = tune(tiny, images, "dog", config=config)
        tiny.load_denoiser_state(start)
        checkpointed = tune(tiny, images, "dog", config=attrs.evolve(config, gradient_checkpointing=True))
    finally:
        tiny.load_denoiser_state(start)
    assert not tiny.unet.is_gradient_checkpointing, "switched off again after the tune"
    assert [r["loss"] for r in checkpointed.losses] == pytest.approx([r["loss"] for r in plain.losses], rel=1e-5)
    for name, value in plain.denoiser_state.items():
        torch.testing.assert_close(checkpointed.denoiser_state[name], value, rtol=1e-5, atol=1e-6)


def test_hifi_with_gradient_checkpointing_learns_the_same_c_s(tiny):
    """Checkpointing recomputes the UNet's activations for the gradient that reaches c_s: same c_s, less memory."""
    g = torch.Generator().manual_seed(4)
    images = torch.rand(3, 3, tiny.resolution, tiny.resolution, generator=g) * 2 - 1
    config = TuneConfig(steps=4, stepwise_steps=1, num_steps=3)
    plain = tune(tiny, images, "dog", config=config)
    checkpointed = tune(tiny, images, "dog", config=attrs.evolve(config, gradient_checkpointing=True))
    assert not tiny.unet.is_gradient_checkpointing, "switched off again after the tune"
    assert [r["loss"] for r in checkpointed.losses] == pytest.approx([r["loss"] for r in plain.losses], rel=1e-5)
    torch.testing.assert_close(checkpointed.subject.c_s, plain.subject.c_s, rtol=1e-5, atol=1e-6)
    for t, value in plain.subject.stepwise.items():
        torch.testing.assert_close(checkpointed.subject.stepwise[t], value, rtol=1e-5, atol=1e-6)
