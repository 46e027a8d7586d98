"""ToyWorld's renderer: 64x64 scenes with one toy-like object, its caption and its exact mask.

Everything is procedural and deterministic from a seed (numpy only). An object is a class
(:data:`CLASSES`: mug, ball, box, ...) with a look (:class:`Look`: main colour, a pattern in
a second colour, and a small mark, like a logo, in a third colour) placed with a position,
scale and rotation (:class:`Pose`) on one of :data:`SCENES` (beach, snow, grass, ...).

Captions name the class, and some of the look and the scene, in this world's words: ``"a
red mug with white stripes and a blue cross on the beach"``. During training, each phrase
is sometimes left out, so the models learn both "a mug" (any look) and the full wording.
The subjects of :mod:`hifi.toyworld.subjects` are looks that the training sampler never
draws (:func:`sample_object` rejects them), each photographed 4 to 6 times.

Rendering is done at 2x and averaged down, so edges are anti-aliased; the mask is the
object's coverage thresholded at one half.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import numpy as np

__all__ = [
    "CLASSES",
    "COLOURS",
    "MARKS",
    "PATTERNS",
    "SCENES",
    "SIZE",
    "Look",
    "Pose",
    "ToyObject",
    "caption",
    "detail_coverage",
    "render",
    "sample_object",
    "sample_pose",
    "vocabulary",
]

SIZE = 64
"""Image side in pixels."""

CLASSES = ("mug", "ball", "box", "bottle", "star", "cone", "ring", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 220, 40),
    "green": (50, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
PATTERNS = ("plain", "stripes", "dots", "checks")
MARKS = ("none", "spot", "cross", "diamond")
SCENES: dict[str, str] = {
    # scene key -> how a caption places the object there
    "beach": "on the beach",
    "snow": "in the snow",
    "grass": "on the grass",
    "brick": "by a brick wall",
    "water": "on the water",
    "wood": "on a wooden floor",
    "night": "under the night sky",
    "forest": "in the forest",
    "desert": "in the desert",
    "kitchen": "in the kitchen",
}


@attrs.frozen
class Look:
    """What an object looks like, apart from where it is."""

    cls: str
    colour: str
    pattern: str = "plain"
    colour2: str = "white"
    mark: str = "none"
    mark_colour: str = "black"

    def __attrs_post_init__(self) -> None:
        for value, allowed in ((self.cls, CLASSES), (self.colour, COLOURS), (self.pattern, PATTERNS),
                               (self.colour2, COLOURS), (self.mark, MARKS), (self.mark_colour, COLOURS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {tuple(allowed)}")


@attrs.frozen
class Pose:
    """Centre (fractions of the image), half-size (fraction of the image), rotation (degrees)."""

    cx: float = 0.5
    cy: float = 0.55
    scale: float = 0.3
    angle: float = 0.0


@attrs.frozen
class ToyObject:
    look: Look
    pose: Pose
    scene: str


def vocabulary() -> list[str]:
    """Every word a ToyWorld caption or prompt template can use (the tokenizer's merges)."""
    words = {"a", "an", "the", "with", "and", "of", "photo", "picture", "toy", "by", "in", "on",
             "under", "wall", "floor", "sky", "big", "small", "close", "up", "view", "top",
             "background", "seen", "from", "next", "to", "front", "behind", "near", "sks"}
    words.update(CLASSES, COLOURS, PATTERNS[1:], MARKS[1:])
    for phrase in SCENES.values():
        words.update(phrase.split())
    return sorted(words)


# -- sampling ---------------------------------------------------------------------------------


def sample_pose(rng: np.random.Generator) -> Pose:
    return Pose(
        cx=float(rng.uniform(0.3, 0.7)),
        cy=float(rng.uniform(0.35, 0.7)),
        scale=float(rng.uniform(0.2, 0.32)),
        angle=float(rng.uniform(-30.0, 30.0)),
    )


def sample_object(rng: np.random.Generator, exclude: Sequence[Look] = ()) -> ToyObject:
    """A random training object; any look in ``exclude`` (the subjects) is drawn again."""
    colours = list(COLOURS)
    held_out = set(exclude)
    while True:
        colour = str(rng.choice(colours[:-1]))  # black is for marks and patterns only
        pattern = str(rng.choice(PATTERNS))
        colour2 = str(rng.choice([c for c in colours if c != colour]))
        mark = str(rng.choice(MARKS))
        mark_colour = str(rng.choice([c for c in colours if c != colour]))
        look = Look(str(rng.choice(CLASSES)), colour, pattern, colour2, mark, mark_colour)
        if look not in held_out:
            break
    return ToyObject(look, sample_pose(rng), str(rng.choice(list(SCENES))))


def caption(obj: ToyObject, rng: np.random.Generator | None = None, drop: float = 0.0) -> str:
    """``"a red mug with white stripes and a blue cross on the beach"``.

    With ``rng`` and ``drop`` > 0, the colour, pattern, mark and scene phrases are each left
    out with probability ``drop`` (training captions); without, the full caption.
    """
    look = obj.look

    def keep() -> bool:
        return rng is None or drop <= 0.0 or bool(rng.random() >= drop)

    words = ["a"]
    if keep():
        words.append(look.colour)
    words.append(look.cls)
    extras = []
    if look.pattern != "plain" and keep():
        extras.append(f"{look.colour2} {look.pattern}")
    if look.mark != "none" and keep():
        extras.append(f"a {look.mark_colour} {look.mark}")
    if extras:
        words += ["with", " and ".join(extras)]
    if keep():
        words.append(SCENES[obj.scene])
    return " ".join(words)


# -- rendering --------------------------------------------------------------------------------


def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLOURS[name], dtype=np.float32) / 255.0


def _background(scene: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """An ``[n, n, 3]`` float image in [0, 1] of the scene."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
    img = np.zeros((n, n, 3), np.float32)

    def fill(where: np.ndarray, rgb: Sequence[float]) -> None:
        img[where] = np.asarray(rgb, np.float32)

    jitter = float(rng.uniform(-0.06, 0.06))
    horizon = 0.45 + jitter
    if scene == "beach":
        fill(y < horizon, (0.55, 0.78, 0.95))
        fill((y >= horizon) & (y < horizon + 0.1), (0.15, 0.45, 0.75))
        fill(y >= horizon + 0.1, (0.93, 0.84, 0.6))
    elif scene == "snow":
        fill(y < horizon, (0.72, 0.78, 0.85))
        fill(y >= horizon, (0.97, 0.97, 1.0))
    elif scene == "grass":
        fill(y < horizon - 0.1, (0.6, 0.82, 0.98))
        fill(y >= horizon - 0.1, (0.3, 0.62, 0.2))
        blades = (np.sin(x * 90.0 + y * 7.0) > 0.6) & (y >= horizon)
        fill(blades, (0.22, 0.5, 0.14))
    elif scene == "brick":
        fill(np.ones_like(y, dtype=bool), (0.7, 0.3, 0.22))
        row = np.floor(y * 8.0 + jitter)
        mortar = ((y * 8.0 + jitter) % 1.0 < 0.15) | (((x * 4.0 + 0.5 * (row % 2)) % 1.0) < 0.06)
        fill(mortar, (0.82, 0.8, 0.75))
    elif scene == "water":
        fill(np.ones_like(y, dtype=bool), (0.1, 0.35, 0.6))
        waves = np.sin(x * 25.0 + np.sin(y * 20.0) * 2.0 + jitter * 30.0) > 0.7
        fill(waves, (0.4, 0.65, 0.85))
    elif scene == "wood":
        fill(np.ones_like(y, dtype=bool), (0.6, 0.4, 0.2))
        seams = ((x * 5.0 + jitter) % 1.0) < 0.06
        fill(seams, (0.35, 0.22, 0.1))
    elif scene == "night":
        fill(np.ones_like(y, dtype=bool), (0.05, 0.07, 0.22))
        stars = rng.random((n, n)) < 0.012
        fill(stars, (1.0, 1.0, 0.9))
        fill(y > 0.85 + jitter, (0.08, 0.1, 0.08))
    elif scene == "forest":
        fill(np.ones_like(y, dtype=bool), (0.1, 0.32, 0.12))
        trunks = ((x * 6.0 + jitter * 10.0) % 1.0) < 0.12
        fill(trunks & (y < 0.8), (0.35, 0.22, 0.12))
        fill(y >= 0.8, (0.2, 0.25, 0.1))
    elif scene == "desert":
        fill(y < horizon, (0.98, 0.85, 0.55))
        fill(y >= horizon, (0.88, 0.6, 0.3))
        dunes = np.sin(x * 8.0 + jitter * 20.0) * 0.04 + horizon + 0.15
        fill(y > dunes, (0.8, 0.5, 0.25))
    elif scene == "kitchen":
        fill(np.ones_like(y, dtype=bool), (0.92, 0.92, 0.88))
        tiles = ((x * 6.0) % 1.0 < 0.05) | ((y * 6.0 + jitter) % 1.0 < 0.05)
        fill(tiles, (0.55, 0.6, 0.65))
        fill(y > 0.75, (0.45, 0.55, 0.6))
    else:
        raise ValueError(f"unknown scene {scene!r}; choose from {tuple(SCENES)}")
    return img


def _shape(cls: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a class in object coordinates (u right, v down, the object in [-1, 1]^2)."""
    r = np.hypot(u, v)
    if cls == "ball":
        return r < 0.85
    if cls == "box":
        return (np.abs(u) < 0.72) & (np.abs(v) < 0.72)
    if cls == "mug":
        body = (np.abs(u + 0.18) < 0.55) & (np.abs(v) < 0.72)
        rh = np.hypot(u - 0.42, v)
        handle = (rh > 0.2) & (rh < 0.42) & (u > 0.37)
        return body | handle
    if cls == "bottle":
        body = (np.abs(u) < 0.42) & (v > -0.25) & (v < 0.92)
        neck = (np.abs(u) < 0.17) & (v > -0.92) & (v <= -0.25)
        return body | neck
    if cls == "star":
        # Five points: the radius goes from 0.95 at a point to 0.42 between points, linearly.
        theta = (np.arctan2(u, -v) / (2.0 * math.pi / 5.0)) % 1.0
        return r < 0.42 + 0.53 * np.abs(theta - 0.5) * 2.0
    if cls == "cone":
        return (v > -0.9) & (v < 0.8) & (np.abs(u) < 0.5 * (v + 0.9) / 1.7 + 0.04)
    if cls == "ring":
        return (r > 0.45) & (r < 0.88)
    if cls == "heart":
        x, y = u / 0.85, -(v + 0.1) / 0.85
        return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 < 0.0
    raise ValueError(f"unknown class {cls!r}; choose from {CLASSES}")


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the second colour goes, in object coordinates."""
    if pattern == "plain":
        return np.zeros_like(u, dtype=bool)
    if pattern == "stripes":
        return (v * 2.5) % 1.0 < 0.45
    if pattern == "dots":
        return np.hypot((u * 2.0) % 1.0 - 0.5, (v * 2.0) % 1.0 - 0.5) < 0.22
    if pattern == "checks":
        return (np.floor(u * 2.0) + np.floor(v * 2.0)) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")


def _mark(mark: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The mark, centred a little above the object's middle."""
    du, dv = u, v + 0.05
    if mark == "none":
        return np.zeros_like(u, dtype=bool)
    if mark == "spot":
        return np.hypot(du, dv) < 0.3
    if mark == "cross":
        return ((np.abs(du) < 0.1) & (np.abs(dv) < 0.36)) | ((np.abs(dv) < 0.1) & (np.abs(du) < 0.36))
    if mark == "diamond":
        return np.abs(du) + np.abs(dv) < 0.36
    raise ValueError(f"unknown mark {mark!r}; choose from {MARKS}")


def _object_coords(pose: Pose, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Object coordinates ``(u, v)`` of the centres of an ``n`` x ``n`` pixel grid."""
    y, x = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / n
    a = math.radians(pose.angle)
    dx, dy = (x - pose.cx) / pose.scale, (y - pose.cy) / pose.scale
    return math.cos(a) * dx + math.sin(a) * dy, -math.sin(a) * dx + math.cos(a) * dy


def detail_coverage(obj: ToyObject, size: int = SIZE) -> np.ndarray:
    """Where an object's details show: the fraction of each pixel its pattern or mark covers.

    ``[size, size]`` float32 in [0, 1] (rendered at 2x and averaged, as :func:`render`): the
    second colour's and the mark colour's pixels inside the object; zeros for a plain,
    unmarked look. The UNet's training weights its loss there (``unet_detail_weight``).
    """
    n = size * 2
    u, v = _object_coords(obj.pose, n)
    look = obj.look
    detail = _shape(look.cls, u, v) & (_pattern(look.pattern, u, v) | _mark(look.mark, u, v))
    return detail.reshape(size, 2, size, 2).mean(axis=(1, 3)).astype(np.float32)


def render(obj: ToyObject, seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Render an object: ``(image [size, size, 3] uint8, mask [size, size] bool)``."""
    rng = np.random.default_rng(seed)
    n = size * 2
    img = _background(obj.scene, n, rng)
    pose, look = obj.pose, obj.look
    u, v = _object_coords(pose, n)
    inside = _shape(look.cls, u, v)
    # Soft shading: a little darker towards the object's lower right, as if lit from above left.
    shade = (1.0 - 0.12 * np.clip((u + v) / 2.0, -1.0, 1.0))[..., None]
    colour = np.where(_pattern(look.pattern, u, v)[..., None], _rgb(look.colour2), _rgb(look.colour))
    colour = np.where(_mark(look.mark, u, v)[..., None], _rgb(look.mark_colour), colour)
    img = np.where(inside[..., None], np.clip(colour * shade, 0.0, 1.0), img)
    small = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    coverage = inside.reshape(size, 2, size, 2).mean(axis=(1, 3))
    return (np.round(small * 255.0)).astype(np.uint8), coverage >= 0.5
