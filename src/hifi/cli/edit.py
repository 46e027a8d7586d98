"""``hifi edit``: null-text inversion and prompt-to-prompt word swap on a photo, no subject.

Also the flags that ``hifi replace`` shares. The photo is resized (not cropped) to the
backend's square resolution and the result back to the photo's size;
``--save-intermediates`` writes, beside ``--out``, the reconstruction, the mean
cross-attention maps of the tokens that kept their own maps, a before / reconstruction /
after strip, and a JSON summary with the null-text losses. The workflow is
:func:`hifi.workflows.edit.edit_photo`.
"""

from __future__ import annotations

import argparse
from typing import Any

from hifi.algorithms.null_text import NullTextConfig
from hifi.cli.common import add_backend_flags, backend_from_args, note, warn
from hifi.execution.fastpath import ACCEL_MODES
from hifi.workflows.checks import unknown_word_warnings
from hifi.workflows.edit import PhotoEdit, check_edit, edit_photo

__all__ = ["add_edit_flags", "config_from_args", "register", "report", "run"]


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
    """The null-text settings the flags name (a clear error for a negative count or rate)."""
    return NullTextConfig(
        guidance=args.guidance, num_steps=args.ddim_steps, inner_steps=args.inner_steps, lr=args.lr,
        tolerance=args.tolerance,
    )


def report(result: PhotoEdit) -> int:
    """Print an edit's notes and the files it wrote; the exit status."""
    for message in result.notes:
        note(message)
    print(f"wrote {', '.join(str(p) for p in result.written)}")
    return 0


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_edit(args.image, args.out, args.caption, args.source_word, config)  # before a model loads
    backend = backend_from_args(args)
    for w in unknown_word_warnings(backend, [args.caption, args.target_word]):
        warn(w)
    return report(edit_photo(
        backend, args.image, args.caption, args.source_word, args.target_word, args.out, config=config,
        intermediates=args.save_intermediates, progress=not args.quiet, accel=args.accel,
    ))


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
