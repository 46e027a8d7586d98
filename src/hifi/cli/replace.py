"""``hifi replace``: put a learned subject in place of a photo's subject (Section 3.4, Algorithm 3)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import attrs

from hifi.algorithms.replace import replace_subject, swap_caption_word
from hifi.algorithms.subject import SUBJECT_SLOT
from hifi.cli.common import add_backend_flags, backend_from_args
from hifi.cli.edit import add_edit_flags, config_from_args, note, photo_note, to_backend, write_edit
from hifi.execution.fastpath import check_accel
from hifi.io.images import load_image
from hifi.io.runs import apply_run, load_run
from hifi.perception import TemplateCaptioner


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.caption:
        swap_caption_word(args.caption, args.source_word, SUBJECT_SLOT)  # fail before loading a model
    learned = load_run(args.run)
    photo = load_image(args.image)
    backend = backend_from_args(args, name=learned.meta.backend, model=learned.meta.model_id)
    check_accel(args.accel, backend.device)  # before any work
    subject = apply_run(learned, backend)
    message = photo_note(args.image, photo, backend.resolution)
    if message:
        note(message)
    image = to_backend(photo, backend.resolution)
    caption = args.caption
    if not caption:
        captioner = TemplateCaptioner()
        caption = captioner.caption(image.unsqueeze(0), args.source_word)[0]
        note(f"no --caption: the {captioner.name} captioner says {caption!r}")
    edit = replace_subject(
        backend, subject, image, caption, args.source_word, config=config,
        attention_maps=args.save_intermediates, progress=not args.quiet, accel=args.accel,
    )
    extra = {
        "image": str(args.image), "run": str(learned.path), "mode": subject.mode, "backend": backend.name,
        "source_word": args.source_word, "null_text_config": attrs.asdict(config),
    }
    written = write_edit(edit, photo, Path(args.out), args.save_intermediates, extra)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("replace", help="replace a photo's subject with a learned one (Algorithm 3)")
    p.add_argument("--run", required=True, help="run folder written by `hifi tune`")
    p.add_argument("--source-word", required=True, help="the word of the caption naming the subject to replace")
    p.add_argument(
        "--caption", default=None,
        help='what the photo shows, e.g. "a photo of a cat on the grass" (default: "a photo of a SOURCE_WORD")',
    )
    add_edit_flags(p)
    add_backend_flags(p, default=None)
    p.set_defaults(func=run)
