"""ToyWorld's detail measures: the renderer's detail coverage, the exact description, the detail
classifier's targets and augmentation, the following rates and the reference rows (issue 24)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hifi.toyworld.subjects import PROMPTS, SUBJECTS, exact_prompt, subject_photos
from hifi.toyworld.world import Look, Pose, ToyObject, caption, detail_coverage, render


def test_detail_coverage_is_the_pattern_and_mark_inside_the_object():
    pose = Pose(cx=0.5, cy=0.5, scale=0.3, angle=10.0)
    plain = ToyObject(Look("box", "red"), pose, "snow")
    assert detail_coverage(plain).sum() == 0.0
    marked = ToyObject(Look("box", "red", mark="spot", mark_colour="blue"), pose, "snow")
    image, mask = render(marked, seed=1)
    cover = detail_coverage(marked)
    assert cover.shape == (64, 64) and 0.0 <= cover.min() and cover.max() <= 1.0
    assert cover[~mask].max() <= 0.5  # only the object's pixels (anti-aliased edges aside)
    # Where the spot covers a whole pixel, the render shows the mark's colour (with the shading).
    full = cover == 1.0
    assert full.sum() > 20
    blue = np.asarray([40, 80, 220], np.float32)
    assert np.abs(image[full].astype(np.float32) / blue - 1.0).mean() < 0.15
    striped = ToyObject(Look("box", "red", "stripes", "white", "spot", "blue"), pose, "snow")
    assert detail_coverage(striped).sum() > cover.sum() + 100  # stripes add a good part of the box


def test_exact_prompt_is_the_full_caption():
    for look in SUBJECTS.values():
        for template, scene in ((PROMPTS[0], "beach"), (PROMPTS[1], "snow")):
            assert exact_prompt(template, look) == caption(ToyObject(look, Pose(), scene))
    assert exact_prompt("a {0} {1}", Look("ball", "blue")) == "a blue ball"


def test_wilson_interval_holds_the_rate_and_narrows():
    from hifi_backends.toy.quality import wilson

    lo, hi = wilson(8, 10)
    assert lo < 0.8 < hi and 0.0 <= lo and hi <= 1.0
    lo2, hi2 = wilson(80, 100)
    assert lo < lo2 < 0.8 < hi2 < hi
    assert wilson(0, 0) == (0.0, 1.0) and wilson(10, 10)[1] == 1.0


def test_detail_hits_need_the_kind_and_its_colour():
    from hifi_backends.toy.quality import detail_hits

    look = Look("mug", "red", "stripes", "white", "diamond", "yellow")
    found = {"pattern": ["stripes", "stripes", "dots", "plain"], "colour2": ["white", "blue", "white", "white"],
             "mark": ["diamond", "diamond", "diamond", "spot"], "mark_colour": ["yellow", "yellow", "red", "yellow"]}
    hits = detail_hits(found, [look] * 4)
    assert hits["pattern"] == [True, False, False, False]
    assert hits["pattern_kind"] == [True, True, False, False]
    assert hits["mark"] == [True, True, False, False]
    assert hits["mark_kind"] == [True, True, True, False]
    # A plain, unmarked look: the colours are not asked for.
    bare = Look("ball", "blue")
    found = {"pattern": ["plain"], "colour2": ["red"], "mark": ["none"], "mark_colour": ["green"]}
    assert detail_hits(found, [bare]) == {"pattern": [True], "mark": [True], "pattern_kind": [True],
                                          "mark_kind": [True]}


def test_detail_labels_ignore_the_colour_of_what_a_look_lacks():
    from hifi.toyworld.world import COLOURS, MARKS, PATTERNS
    from hifi_backends.toy.training.towers import detail_labels

    objects = [ToyObject(Look("mug", "red", "dots", "blue", "none", "green"), Pose(), "snow"),
               ToyObject(Look("mug", "red", "plain", "blue", "cross", "green"), Pose(), "snow")]
    labels = detail_labels(objects)
    colours = list(COLOURS)
    assert labels["pattern"].tolist() == [PATTERNS.index("dots"), PATTERNS.index("plain")]
    assert labels["colour2"].tolist() == [colours.index("blue"), -100]
    assert labels["mark"].tolist() == [MARKS.index("none"), MARKS.index("cross")]
    assert labels["mark_colour"].tolist() == [-100, colours.index("green")]


def test_blur_augment_keeps_range_and_shape_and_blurs():
    from hifi_backends.toy.training.towers import blur_augment

    image, _ = render(ToyObject(Look("box", "red", "stripes", "white"), Pose(scale=0.3), "snow"), seed=0)
    x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0)[None].repeat(64, 1, 1, 1)
    y = blur_augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0.0 and y.max() <= 1.0
    change = (y - x).abs().mean(dim=(1, 2, 3))
    assert (change < 0.02).any() and (change > 0.02).any()  # some nearly untouched, some blurred
    # Blurring softens the stripes' edges: the largest jump between neighbouring pixels shrinks.
    def sharpest(t: torch.Tensor) -> torch.Tensor:
        return (t[..., 1:, :] - t[..., :-1, :]).abs().amax(dim=(1, 2, 3))

    assert sharpest(y).min() < 0.6 * sharpest(x).min()


class _Oracle:
    """A detail reader that answers with a fixed look's details for every image."""

    def __init__(self, look: Look) -> None:
        self.look = look

    def read(self, images: torch.Tensor) -> dict[str, list[str]]:
        n = len(images)
        return {"pattern": [self.look.pattern] * n, "colour2": [self.look.colour2] * n,
                "mark": [self.look.mark] * n, "mark_colour": [self.look.mark_colour] * n}


def test_reference_rows_on_one_subject():
    from hifi.perception.registry import load_embedder
    from hifi.registry import load_backend
    from hifi.workflows.evaluation import Scorers
    from hifi_backends.toy.perception import load_toyclip
    from hifi_backends.toy.quality import REFERENCE_ROWS, reference_rows

    scorers = Scorers(load_embedder("toy-id"), load_toyclip())
    names = ["striped_mug", "dotted_ball"]
    report = reference_rows(load_backend("toy"), scorers, subjects=names, templates=PROMPTS[:1], seeds=(0,),
                            num_steps=4, detail=_Oracle(SUBJECTS["striped_mug"]))
    assert set(report.rows) == set(REFERENCE_ROWS)
    for row, metrics in report.rows.items():
        assert set(metrics) == ({"dino", "clip_i", "clip_t"} if row in ("exact", "class") else {"dino", "clip_i"})
        for entry in metrics.values():
            assert entry["cells"] == 2 and set(entry["per_subject"]) == set(names)
            assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
            assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in entry["per_subject"].values())
    # The real row is the mean cosine of each subject's photos to its other photos.
    photos = torch.stack([torch.from_numpy(p[0]).permute(2, 0, 1).float() / 127.5 - 1
                          for p in subject_photos("striped_mug")])
    f = scorers.image_features(photos)["dino"]
    sims = f @ f.T
    expected = float(sims[~torch.eye(5, dtype=torch.bool)].mean())
    assert report.rows["real"]["dino"]["per_subject"]["striped_mug"] == pytest.approx(expected, abs=1e-6)
    # The oracle reads the mug's details everywhere: all of the mug's images hit, none of the ball's.
    for key in ("photos", "vae", "exact"):
        for measure in ("pattern", "mark"):
            entry = report.detail[key][measure]
            assert entry["per_subject"] == {"striped_mug": 1.0, "dotted_ball": 0.0}
            assert entry["n"] == (10 if key != "exact" else 2) and entry["hits"] == entry["n"] // 2


def test_latent_probe_variants_have_the_latent_they_name():
    from benchmarks.toyworld_latent_probe import variant_config
    from diffusers import AutoencoderKL

    x = torch.zeros(1, 3, 64, 64)
    for name, side in (("f8c4", 8), ("f4c4", 16)):
        with torch.no_grad():
            latent = AutoencoderKL(**variant_config(name)).encode(x).latent_dist.mean
        assert latent.shape == (1, 4, side, side), name
    with pytest.raises(ValueError, match="factor"):
        variant_config("f2c4")
