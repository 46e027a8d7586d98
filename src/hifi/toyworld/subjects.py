"""ToyWorld's evaluation subjects: looks never drawn in training, photographed like DreamBooth's.

Each subject is a :class:`~hifi.toyworld.world.Look` (a class, a main colour, a pattern in
a second colour and a mark in a third) that :func:`~hifi.toyworld.world.sample_object`
never draws, with 5 photos in different scenes and poses (deterministic). The prompt list
follows the DreamBooth set's 25 prompts in this world's words: 10 recontextualisations, the
same 10 as "a photo of ...", and 5 property modifications ("a red {0} {1}").

:func:`export_dataset` writes the subjects in the DreamBooth folder layout (one folder of
photos per subject, plus ``prompts_and_classes.txt``) and their exact masks beside them,
so ``hifi eval`` reads ToyWorld exactly as it reads the real set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from hifi.io.images import atomic_path, save_image
from hifi.toyworld.world import SCENES, Look, ToyObject, render, sample_pose

__all__ = ["PROMPTS", "SUBJECTS", "exact_prompt", "export_dataset", "subject_photos"]

SUBJECTS: dict[str, Look] = {
    "striped_mug": Look("mug", "red", "stripes", "white", "diamond", "yellow"),
    "dotted_ball": Look("ball", "blue", "dots", "yellow", "cross", "white"),
    "checked_box": Look("box", "green", "checks", "white", "spot", "red"),
    "striped_bottle": Look("bottle", "purple", "stripes", "yellow", "spot", "white"),
    "dotted_star": Look("star", "yellow", "dots", "red", "spot", "blue"),
    "striped_cone": Look("cone", "orange", "stripes", "white", "diamond", "blue"),
    "striped_heart": Look("heart", "pink", "stripes", "blue", "spot", "yellow"),
    "blue_box": Look("box", "white", "stripes", "blue", "cross", "red"),
    "checked_ball": Look("ball", "green", "checks", "black", "diamond", "orange"),
    "dotted_mug": Look("mug", "yellow", "dots", "blue", "cross", "purple"),
}
"""The evaluation subjects (folder name -> look)."""

PHOTOS_PER_SUBJECT = 5

PROMPTS: tuple[str, ...] = (
    tuple(f"a {{0}} {{1}} {where}" for where in SCENES.values())
    + tuple(f"a photo of a {{0}} {{1}} {where}" for where in SCENES.values())
    + tuple(f"a {colour} {{0}} {{1}}" for colour in ("red", "blue", "green", "yellow", "purple"))
)
"""25 prompt templates, ``{0}`` the unique token and ``{1}`` the class word (DreamBooth's format)."""


def exact_prompt(template: str, look: Look) -> str:
    """A prompt template with the subject's exact description in place of ``{0} {1}``.

    ``exact_prompt("a {0} {1} on the beach", SUBJECTS["striped_mug"])`` is ``"a red mug with
    white stripes and a yellow diamond on the beach"``: what an untuned model is told when it
    is told everything the subject is made of (the check's reference row).
    """
    extras = []
    if look.pattern != "plain":
        extras.append(f"{look.colour2} {look.pattern}")
    if look.mark != "none":
        extras.append(f"a {look.mark_colour} {look.mark}")
    rest = look.cls + (" with " + " and ".join(extras) if extras else "")
    return template.format(look.colour, rest)


def subject_photos(name: str, n: int = PHOTOS_PER_SUBJECT) -> list[tuple[np.ndarray, np.ndarray, ToyObject]]:
    """``n`` photos of a subject: ``(image uint8 [64, 64, 3], mask bool [64, 64], object)``."""
    if name not in SUBJECTS:
        raise ValueError(f"unknown ToyWorld subject {name!r}; choose from {', '.join(SUBJECTS)}")
    index = list(SUBJECTS).index(name)
    rng = np.random.default_rng(10_000 + index)
    scenes = rng.permutation(list(SCENES))[:n]
    photos = []
    for i, scene in enumerate(scenes):
        obj = ToyObject(SUBJECTS[name], sample_pose(rng), str(scene))
        image, mask = render(obj, seed=100_000 + 100 * index + i)
        photos.append((image, mask, obj))
    return photos


def _prompt_file(names: list[str]) -> str:
    classes = "\n".join(f"{name},{SUBJECTS[name].cls}" for name in names)
    listing = ",\n".join(f"'{p}'.format(unique_token, class_token)" for p in PROMPTS)
    block = f"prompt_list = [\n{listing}\n]\n"
    return (
        "Classes\n\nsubject_name,class\n" + classes + "\n\nPrompts\n\nObject Prompts\n\n" + block
        + "\nLive Subject Prompts\n\n" + block
    )


def export_dataset(out: str | Path, subjects: list[str] | None = None) -> tuple[Path, Path]:
    """Write ToyWorld's subjects in the DreamBooth layout; returns ``(dataset, masks)`` folders.

    ``out/dataset/<subject>/NN.png`` and ``prompts_and_classes.txt``, and the exact masks in
    ``out/masks/<subject>/NN.png`` (``hifi eval --masks out/masks``).
    """
    out = Path(out)
    dataset, masks = out / "dataset", out / "masks"
    names = list(subjects or SUBJECTS)
    for name in names:
        for i, (image, mask, _obj) in enumerate(subject_photos(name)):
            save_image(Image.fromarray(image), dataset / name / f"{i:02d}.png")
            save_image(Image.fromarray((mask * 255).astype(np.uint8)), masks / name / f"{i:02d}.png")
    dataset.mkdir(parents=True, exist_ok=True)
    with atomic_path(dataset / "prompts_and_classes.txt") as tmp:
        tmp.write_text(_prompt_file(names))
    return dataset, masks
