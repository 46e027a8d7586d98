"""``hifi edit``: null-text inversion and prompt-to-prompt word swap on a photo, no subject.

Also the photo handling and outputs that ``hifi replace`` shares: the photo is resized
(not cropped) to the backend's square resolution and the result back to the photo's size;
``--save-intermediates`` writes, beside ``--out``, the reconstruction, the mean
cross-attention maps of the tokens that kept their own maps, a before / reconstruction /
after strip, and a JSON summary with the null-text losses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import attrs
from PIL import Image
from torch import Tensor

from hifi.algorithms.null_text import NullTextConfig
from hifi.algorithms.replace import Edit, edit_image, swap_caption_word
from hifi.cli.common import add_backend_flags, backend_from_args
from hifi.execution.fastpath import ACCEL_MODES, check_accel
from hifi.io.images import image_to_tensor, load_image, make_grid, save_image, tensor_to_image, write_json

__all__ = ["add_edit_flags", "config_from_args", "register", "run", "write_edit"]


def add_edit_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the photo, the output, and null-text inversion (shared with ``hifi replace``)."""
    p.add_argument("--image", required=True, help="the photo to edit")
    p.add_argument("--out", required=True, help="image file to write (PNG, JPEG ...)")
    p.add_argument("--ddim-steps", type=int, default=50, help="T, DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance weight w (default 7.5)")
    p.add_argument("--inner-steps", type=int, default=10, help="K, null-text updates per step (default 10)")
    p.add_argument("--lr", type=float, default=1e-2, help="null-text learning rate (default 1e-2)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="stop a step's updates below this loss")
    p.add_argument(
        "--save-intermediates", action="store_true",
        help="also write the reconstruction, attention maps, a before/after strip and a JSON summary",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--accel", choices=ACCEL_MODES, default="eager",
                   help="run null-text inversion eagerly, through torch.compile, or as CUDA graphs"
                        " (graph: CUDA only; it also holds the UNet channels-last)")


def config_from_args(args: argparse.Namespace) -> NullTextConfig:
    return NullTextConfig(
        guidance=args.guidance, num_steps=args.ddim_steps, inner_steps=args.inner_steps, lr=args.lr,
        tolerance=args.tolerance,
    )


def note(message: str) -> None:
    print(f"hifi: note: {message}", file=sys.stderr)


def photo_note(path: str, photo: Image.Image, resolution: int) -> str | None:
    """Why the photo is resized, when it is."""
    if photo.size == (resolution, resolution):
        return None
    w, h = photo.size
    return f"{path} is {w}x{h}: edited at {resolution}x{resolution} and resized back to {w}x{h}"


def to_backend(photo: Image.Image, resolution: int) -> Tensor:
    """The whole photo (no crop) as a square ``[3, S, S]`` tensor in [-1, 1]."""
    return image_to_tensor(photo.resize((resolution, resolution), Image.Resampling.BICUBIC), resolution)


def write_edit(edit: Edit, photo: Image.Image, out: Path, intermediates: bool, extra: dict[str, Any]) -> list[Path]:
    """Write the edit at the photo's size, and the intermediates; return the paths written."""
    save_image(tensor_to_image(edit.image).resize(photo.size, Image.Resampling.BICUBIC), out)
    written = [out]
    if not intermediates:
        return written
    side = edit.image.shape[-1]
    stem = out.with_suffix("")
    recon = stem.with_name(f"{stem.name}.reconstruction.png")
    save_image(tensor_to_image(edit.reconstruction).resize(photo.size, Image.Resampling.BICUBIC), recon)
    strip = stem.with_name(f"{stem.name}.before-after.png")
    before = photo.resize((side, side), Image.Resampling.BICUBIC)
    save_image(make_grid([before, tensor_to_image(edit.reconstruction), tensor_to_image(edit.image)], cols=3), strip)
    written += [recon, strip]
    own = [int(i) for i in edit.own.nonzero().flatten()]
    if edit.attention is not None and own:
        maps = edit.attention[1].permute(2, 0, 1)[own]  # the edit's maps of its own tokens
        maps = maps / maps.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
        attention = stem.with_name(f"{stem.name}.attention.png")
        save_image(make_grid([tensor_to_image(m) for m in maps], cols=len(own), cell=side), attention)
        written.append(attention)
    inversion = edit.inversion
    error = float((edit.reconstruction_latents - inversion.trajectory[0]).pow(2).mean())
    summary = stem.with_name(f"{stem.name}.json")
    write_json(summary, {
        **extra,
        "caption": edit.caption,
        "edited_caption": edit.edited_caption,
        "own_token_positions": own,
        "token_alignment": [int(i) for i in edit.index],
        "null_text_losses": list(inversion.losses),
        "null_text_iterations": list(inversion.iterations),
        "reconstruction_latent_mse": error,
    })
    written.append(summary)
    return written


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    edited = swap_caption_word(args.caption, args.source_word, args.target_word)
    photo = load_image(args.image)
    backend = backend_from_args(args)
    check_accel(args.accel, backend.device)  # before any work
    message = photo_note(args.image, photo, backend.resolution)
    if message:
        note(message)
    edit = edit_image(
        backend, to_backend(photo, backend.resolution), args.caption, edited, config=config,
        attention_maps=args.save_intermediates, progress=not args.quiet, accel=args.accel,
    )
    extra = {"image": str(args.image), "backend": backend.name, "null_text_config": attrs.asdict(config)}
    written = write_edit(edit, photo, Path(args.out), args.save_intermediates, extra)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "edit", help="swap a word of a photo's caption: null-text inversion + prompt-to-prompt (no subject)"
    )
    p.add_argument("--caption", required=True, help='what the photo shows, e.g. "a photo of a cat on the grass"')
    p.add_argument("--source-word", required=True, help="the caption's word to swap, e.g. cat")
    p.add_argument("--target-word", required=True, help="what to put in its place, e.g. dog")
    add_edit_flags(p)
    add_backend_flags(p)
    p.set_defaults(func=run)
