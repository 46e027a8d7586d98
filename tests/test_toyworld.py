"""ToyWorld: the renderer, the subjects, the training script, and the bundled model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hifi.toyworld.subjects import PROMPTS, SUBJECTS, export_dataset, subject_photos
from hifi.toyworld.world import (
    CLASSES,
    SCENES,
    Look,
    Pose,
    ToyObject,
    caption,
    render,
    sample_object,
    vocabulary,
)
from hifi.workflows.evaluation import load_dreambooth
from hifi_backends.toy.backend import BUNDLE


def test_render_is_deterministic_and_the_mask_is_the_object():
    obj = ToyObject(Look("box", "red"), Pose(cx=0.5, cy=0.5, scale=0.25, angle=0.0), "snow")
    a, mask = render(obj, seed=3)
    b, _ = render(obj, seed=3)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    # An axis-aligned box of half-size 0.72 * 0.25 * 64 = 11.5 px around the centre.
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - 31.5) < 1 and abs(ys.mean() - 31.5) < 1
    assert 21 <= xs.max() - xs.min() + 1 <= 24
    red = np.asarray([220, 40, 40])
    assert np.abs(a[mask].astype(int) - red).mean() < 25  # inside: the object's colour (shaded)
    assert np.abs(a[~mask].astype(int) - red).mean() > 100  # outside: snow


def test_every_class_and_scene_renders_distinctly():
    images = {}
    for cls in CLASSES:
        _, mask = render(ToyObject(Look(cls, "blue"), Pose(), "grass"))
        images[cls] = mask
        assert 0.03 < mask.mean() < 0.35, cls
    masks = list(images.values())
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] ^ masks[j]).mean() > 0.01
    backgrounds = [render(ToyObject(Look("ball", "red"), Pose(scale=0.01), s))[0].reshape(-1, 3).mean(0)
                   for s in SCENES]
    for i in range(len(backgrounds)):
        for j in range(i + 1, len(backgrounds)):
            assert np.abs(backgrounds[i] - backgrounds[j]).max() > 5


def test_captions_name_class_colour_pattern_mark_and_scene():
    obj = ToyObject(Look("mug", "red", "stripes", "white", "cross", "blue"), Pose(), "beach")
    assert caption(obj) == "a red mug with white stripes and a blue cross on the beach"
    rng = np.random.default_rng(0)
    dropped = {caption(obj, rng, drop=0.5) for _ in range(200)}
    assert "a mug" in dropped and len(dropped) > 8
    assert all(" mug" in c for c in dropped)


def test_the_sampler_never_draws_an_excluded_look():
    first = [sample_object(np.random.default_rng(7)).look for _ in range(1)]
    # Same seed, the first look excluded: the sampler must draw another.
    again = sample_object(np.random.default_rng(7), exclude=first)
    assert again.look != first[0]
    rng = np.random.default_rng(1)
    held = list(SUBJECTS.values())
    assert all(sample_object(rng, exclude=held).look not in held for _ in range(300))


def test_vocabulary_words_are_single_tokens_and_prompts_leave_room_for_c_s():
    from hifi_backends.toy.models import CONTEXT, build_tokenizer

    tokenizer = build_tokenizer()
    for word in vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    longest = max(
        [p.format("", look.cls) for p in PROMPTS for look in SUBJECTS.values()]
        + ["a photo of a purple bottle with yellow stripes and a white diamond under the night sky"],
        key=lambda p: len(tokenizer(p).input_ids),
    )
    assert len(tokenizer(longest).input_ids) + 5 <= CONTEXT


def test_subjects_have_unique_looks_and_export_in_the_dreambooth_layout(tmp_path):
    assert len(set(SUBJECTS.values())) == len(SUBJECTS) >= 8
    assert all(look.pattern != "plain" and look.mark != "none" for look in SUBJECTS.values())
    photos = subject_photos("striped_mug")
    assert len(photos) == 5 and len({p[2].scene for p in photos}) == 5
    dataset_dir, masks_dir = export_dataset(tmp_path, ["striped_mug", "dotted_ball"])
    dataset = load_dreambooth(dataset_dir)
    assert dataset.classes["striped_mug"] == "mug" and len(dataset.object_prompts) == 25
    assert dataset.object_prompts[0] == "a <subject> on the beach"
    assert sorted(p.name for p in (masks_dir / "dotted_ball").iterdir()) == [f"0{i}.png" for i in range(5)]


def test_training_script_quick_mode_writes_a_loadable_bundle(tmp_path):
    from hifi.algorithms.generate import generate
    from hifi.algorithms.subject import Subject
    from hifi.registry import load_backend
    from hifi_backends.toy.perception import build_toy_detail, build_toy_identity, build_toy_segmenter, build_toyclip
    from hifi_backends.toy.training.pipeline import train_all
    from hifi_backends.toy.training.settings import TrainSettings

    out = tmp_path / "bundle"
    report = train_all(out, tmp_path / "work", TrainSettings.quick(), parallel=False)
    assert set(report["stages"]) >= {"vae", "clip", "identity", "segmenter", "detail", "unet"}
    backend = load_backend("toy", model=str(out))
    assert backend.resolution == 64 and backend.max_length == 32 and backend.latent_channels == 4
    image = generate(backend, Subject.plain("mug"), "a mug on the beach", [0], num_steps=2).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    photos = torch.rand(2, 3, 64, 64) * 2 - 1
    assert build_toy_identity(model=str(out)).embed(photos).shape == (2, 128)
    assert build_toy_segmenter(model=str(out)).segment(photos, "mug").shape == (2, 64, 64)
    clip = build_toyclip(model=str(out))
    assert clip.embed_text(["a mug"]).shape == (1, 64) and clip.embed(photos).shape == (2, 64)
    read = build_toy_detail(model=str(out)).read(photos)
    assert set(read) == {"pattern", "colour2", "mark", "mark_colour"} and all(len(v) == 2 for v in read.values())
    # A second run reuses every finished stage.
    again = train_all(out, tmp_path / "work", TrainSettings.quick(), parallel=False)
    assert again["stages"]["unet"] == report["stages"]["unet"]


def test_the_unet_can_attend_to_the_metric_tower_trained_with_a_colour_term(tmp_path):
    """TrainSettings(unet_text="metric", clip_metric_colour_swap=...): the probes' settings (README)."""
    import attrs
    from safetensors.torch import load_file

    from hifi_backends.toy.training.pipeline import train_all
    from hifi_backends.toy.training.settings import TrainSettings

    settings = attrs.evolve(TrainSettings.quick(), unet_text="metric", clip_metric_colour_swap=1.0)
    train_all(tmp_path / "bundle", tmp_path / "work", settings, parallel=False)
    unet_text = load_file(str(tmp_path / "work" / "text_encoder" / "model.safetensors"))
    metric = load_file(str(tmp_path / "work" / "toyclip_metric" / "text" / "model.safetensors"))
    assert unet_text and all(torch.equal(v, metric[f"text_model.{k}"]) for k, v in unet_text.items())
    with pytest.raises(ValueError, match="unet_text"):  # at once, not after an hour of training
        attrs.evolve(TrainSettings.quick(), unet_text="vit")


def test_the_unet_gets_its_own_tower_and_the_weighted_loss(tmp_path):
    """unet_text="unet": a clip_unet stage (colour term) apart from the metric; Min-SNR, object and detail weights."""
    import attrs
    from safetensors.torch import load_file

    from hifi_backends.toy.training.pipeline import train_all
    from hifi_backends.toy.training.settings import TrainSettings

    settings = attrs.evolve(TrainSettings.quick(), unet_text="unet", unet_snr_gamma=5.0,
                            unet_object_weight=3.0, unet_detail_weight=6.0)
    report = train_all(tmp_path / "bundle", tmp_path / "work", settings, parallel=False)
    assert "clip_unet" in report["stages"] and math.isfinite(report["stages"]["unet"]["final_loss"])
    unet_text = load_file(str(tmp_path / "work" / "text_encoder" / "model.safetensors"))
    own = load_file(str(tmp_path / "work" / "toyclip_unet" / "text" / "model.safetensors"))
    metric = load_file(str(tmp_path / "work" / "toyclip_metric" / "text" / "model.safetensors"))
    assert unet_text and all(torch.equal(v, own[f"text_model.{k}"]) for k, v in unet_text.items())
    assert any(not torch.equal(v, metric[f"text_model.{k}"]) for k, v in unet_text.items())
    # Without it the stage is not run at all.
    plain = train_all(tmp_path / "bundle2", tmp_path / "work2", TrainSettings.quick(), parallel=False)
    assert "clip_unet" not in plain["stages"] and not (tmp_path / "work2" / "toyclip_unet").exists()


def test_the_latent_shape_is_a_setting_and_the_bundle_loads_as_any_other(tmp_path):
    """A three-level VAE (16x16 latents) with 16 channels (SD3's count): the UNet, its cell weights and the
    loaded backend follow the VAE's shape."""
    import attrs

    from hifi.algorithms.generate import generate
    from hifi.algorithms.subject import Subject
    from hifi.registry import load_backend
    from hifi_backends.toy.training.pipeline import train_all
    from hifi_backends.toy.training.settings import TrainSettings

    settings = attrs.evolve(TrainSettings.quick(), vae_width=(16, 32, 64), latent_channels=16,
                            unet_object_weight=3.0, unet_detail_weight=6.0)
    report = train_all(tmp_path / "bundle", tmp_path / "work", settings, parallel=False)
    assert math.isfinite(report["stages"]["unet"]["final_loss"])
    backend = load_backend("toy", model=str(tmp_path / "bundle"))
    assert (backend.vae_scale_factor, backend.latent_channels, backend.resolution) == (4, 16, 64)
    image = generate(backend, Subject.plain("mug"), "a mug on the beach", [0], num_steps=2).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_a_small_model_trained_after_the_bundle_is_installed_and_recorded(tmp_path):
    import json
    import shutil

    from hifi_backends.toy.perception import build_toy_detail
    from hifi_backends.toy.train import main as train_main

    work, bundle = tmp_path / "work", tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("detail"))
    before = json.loads((bundle / "training.json").read_text())
    assert train_main(["--work", str(work), "--install", "detail", "--out", str(bundle)]) == 2  # nothing trained yet
    settings = '{"looks": 16, "detail_steps": 2, "detail_batch": 4, "render_workers": 1}'
    assert train_main(["--work", str(work), "--stages", "render,detail", "--settings", settings]) == 0
    assert train_main(["--work", str(work), "--install", "detail", "--out", str(bundle)]) == 0
    record = json.loads((bundle / "training.json").read_text())
    assert record["installed"]["detail"]["stage"]["steps"] == 2 and "cores" in record["installed"]["detail"]["machine"]
    assert {k: v for k, v in record.items() if k != "installed"} == {k: v for k, v in before.items()
                                                                     if k != "installed"}
    assert len(build_toy_detail(model=str(bundle)).read(torch.zeros(1, 3, 64, 64))["mark"]) == 1
    assert train_main(["--work", str(work), "--install", "unet", "--out", str(bundle)]) == 2


def test_missing_toy_folder_is_one_clear_error(tmp_path):
    from hifi.errors import ModelNotFoundError
    from hifi.registry import load_backend

    with pytest.raises(ModelNotFoundError, match="hifi_backends.toy.train"):
        load_backend("toy", model=str(tmp_path))


# -- the bundled model ------------------------------------------------------------------------


def test_bundle_is_small_enough():
    size = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    assert 0 < size <= 25 * 2**20


def test_bundled_model_follows_prompts():
    """The issue's 80% bound for class and scene, on 16 samples with a margin (full check: benchmarks.toyworld check).

    The margin is two binomial standard deviations: 80% of 16 is 12.8, its deviation 1.6, so
    at least 10 of 16 for the class (the scene, near 100% throughout, keeps its 70%). ToyCLIP
    itself must recognise class and scene on renders (it does: 98% and 100% on 60), and the
    VAE round trip keeps 87% of 60 renders' classes; at least 11 of 16 here. (On 2026-11-27,
    after the GPU fine-tunes, this sample gave class 12, scene 16 and round trip 14 of 16; the
    larger samples, README: class 92% of 60, 88% of 120 and 81% of 240 other prompts. Before
    them, class 9 of 16: the bound held 7 then.)
    """
    from hifi.registry import load_backend
    from hifi_backends.toy.perception import load_toyclip
    from hifi_backends.toy.quality import prompt_following

    report = prompt_following(load_backend("toy"), load_toyclip(), samples=16, seed=1, num_steps=15)
    assert report.renders_scene_accuracy >= 0.9 and report.renders_class_accuracy >= 0.85, report
    assert report.scene_accuracy >= 0.7, report.rows  # tighter than 10 of 16: it was always near 100%
    assert report.class_accuracy >= 10 / 16, report.rows
    assert report.vae_class_accuracy >= 11 / 16, report


def test_bundled_model_draws_the_prompted_colour():
    """98% of 60 in the check (README); chance is 1 in 8."""
    from hifi.registry import load_backend
    from hifi_backends.toy.perception import build_toy_segmenter
    from hifi_backends.toy.quality import colour_following

    report = colour_following(load_backend("toy"), build_toy_segmenter(), samples=12, num_steps=15)
    assert report.renders_colour_accuracy >= 0.9, report.rows
    assert report.colour_accuracy >= 0.6, report.rows


def test_detail_classifier_reads_the_subjects_photos():
    """The judge of pattern and mark following, on the 50 photos of the evaluation subjects: looks it never
    saw in training, cropped by the toy segmenter's mask as in the check (100% and 92% on 2026-12-01)."""
    from hifi_backends.toy.perception import build_toy_detail
    from hifi_backends.toy.quality import detail_hits

    photos = [p for name in SUBJECTS for p in subject_photos(name)]
    images = torch.stack([torch.from_numpy(p[0]).permute(2, 0, 1).float() / 127.5 - 1 for p in photos])
    hits = detail_hits(build_toy_detail().read(images), [p[2].look for p in photos])
    assert np.mean(hits["pattern"]) >= 0.9 and np.mean(hits["mark"]) >= 0.8, hits


def test_bundled_model_draws_the_prompted_pattern_and_mark():
    """Pattern and mark following of the bundle on 40 full captions at T = 15 (the check: 60 at T = 25,
    README), each bound two binomial standard deviations under what this sample gave on 2026-12-01:
    generated, the pattern in its colour 6 of 40, the pattern kind 14, the mark kind 14 (the mark in
    its colour 1 of 40: too few to bound); renders 40 and 28 (the judge's ceiling); the renders' VAE
    round trips 20 and 15 (the latent's ceiling, which no UNet on these latents can pass)."""
    from hifi.registry import load_backend
    from hifi_backends.toy.perception import build_toy_detail
    from hifi_backends.toy.quality import detail_following

    report = detail_following(load_backend("toy"), build_toy_detail(), samples=40, num_steps=15)
    assert report.renders["pattern"]["rate"] >= 0.9 and report.renders["mark"]["rate"] >= 0.55, report.renders
    assert report.vae["pattern"]["rate"] >= 0.34 and report.vae["mark"]["rate"] >= 0.22, report.vae
    generated = report.generated
    assert generated["pattern"]["rate"] >= 0.04, report.rows
    assert generated["pattern_kind"]["rate"] >= 0.2 and generated["mark_kind"]["rate"] >= 0.2, report.rows


def test_nearest_colour_reads_the_object_not_the_scene():
    from hifi_backends.toy.quality import nearest_colour

    images, masks = [], []
    for colour, scene in (("red", "snow"), ("blue", "beach"), ("yellow", "grass")):
        image, mask = render(ToyObject(Look("box", colour), Pose(scale=0.3), scene), seed=2)
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1)
        masks.append(torch.from_numpy(mask))
    masks.append(torch.zeros(64, 64, dtype=torch.bool))  # nothing found
    images.append(images[0])
    assert nearest_colour(torch.stack(images), torch.stack(masks)) == ["red", "blue", "yellow", None]


def test_identity_metric_separates_subjects():
    from hifi_backends.toy.perception import build_toy_identity

    embedder = build_toy_identity()
    feats = {}
    for name in list(SUBJECTS)[:6]:
        images = torch.stack([torch.from_numpy(p[0]).permute(2, 0, 1).float() / 127.5 - 1
                              for p in subject_photos(name)])
        feats[name] = torch.nn.functional.normalize(embedder.embed(images), dim=-1)
    same, other = [], []
    for a in feats:
        sims = feats[a] @ feats[a].T
        same.append(float(sims[~torch.eye(len(sims), dtype=torch.bool)].mean()))
        other += [float((feats[a] @ feats[b].T).mean()) for b in feats if b != a]
    assert min(same) > max(other) - 0.05 and np.mean(same) - np.mean(other) > 0.2
    assert all(math.isfinite(x) for x in same + other)


def test_toyclip_of_an_older_layout_is_one_clear_error(tmp_path):
    import shutil

    from hifi.errors import ModelNotFoundError
    from hifi_backends.toy.perception import load_toyclip

    folder = tmp_path / "old"
    (folder / "unet").mkdir(parents=True)
    (folder / "toyclip").mkdir()
    shutil.copy(BUNDLE / "toyclip" / "text" / "config.json", folder / "toyclip" / "config.json")
    with pytest.raises(ModelNotFoundError, match="hifi_backends.toy.train"):
        load_toyclip(str(folder))
