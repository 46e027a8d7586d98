"""Photos the project draws itself: a made-up subject on varied backgrounds, with exact masks.

Used by ``hifi demo`` and the tests, so that neither needs anyone's photos (and no image
of the DreamBooth set is ever copied into the repository).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from hifi.io.images import save_image

__all__ = ["draw_subject_photos"]

_BACKGROUNDS = ((70, 150, 220), (90, 170, 80), (200, 190, 150), (60, 60, 90), (230, 230, 235), (150, 90, 60))
_SIZES = ((80, 60), (64, 96), (50, 50), (120, 90), (72, 72), (60, 100))
_MODES = ("RGB", "RGBA", "L", "RGB", "RGB", "RGBA")


def draw_subject_photos(folder: str | Path, n: int = 3, with_masks: bool = True) -> tuple[Path, Path]:
    """Draw n photos of one subject, a red box with a yellow stripe, and their masks.

    Sizes, orientations, image modes, backgrounds and the subject's place vary, as a user's
    photos do. Writes ``folder/photos/photoI.png`` and ``folder/masks/photoI.png``;
    returns the two folders.
    """
    folder = Path(folder)
    photos, masks = folder / "photos", folder / "masks"
    for i in range(n):
        w, h = _SIZES[i % len(_SIZES)]
        img = Image.new("RGB", (w, h), _BACKGROUNDS[i % len(_BACKGROUNDS)])
        mask = Image.new("L", (w, h), 0)
        left, top = w // 4 + (i * 3) % (w // 8 + 1), h // 4 + (i * 5) % (h // 8 + 1)
        box = (left, top, left + w // 2, top + h // 2)
        ImageDraw.Draw(img).rectangle(box, fill=(220, 30, 30))
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        stripe = (box[0], box[1] + (box[3] - box[1]) // 4, box[2], box[1] + (box[3] - box[1]) // 4 + 4)
        ImageDraw.Draw(img).rectangle(stripe, fill=(240, 220, 40))
        save_image(img.convert(_MODES[i % len(_MODES)]), photos / f"photo{i}.png")
        if with_masks:
            save_image(mask, masks / f"photo{i}.png")
    return photos, masks
