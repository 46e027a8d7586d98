"""``hifi replace``: put a learned subject in place of a photo's subject (Section 3.4, Algorithm 3).

The workflow is :func:`hifi.workflows.edit.replace_in_photo`.
"""

from __future__ import annotations

import argparse
from typing import Any

from hifi.cli.common import add_backend_flags, backend_from_args, warn
from hifi.cli.edit import add_edit_flags, config_from_args, report
from hifi.io.runs import check_compatible, load_run
from hifi.workflows.checks import unknown_word_warnings
from hifi.workflows.edit import check_edit, replace_in_photo


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_edit(args.image, args.out, args.caption, args.source_word, config)  # before a model loads
    learned = load_run(args.run)
    backend = backend_from_args(args, name=learned.meta.backend, model=learned.meta.model_id)
    check_compatible(learned.meta, backend)
    for w in unknown_word_warnings(backend, [args.caption or args.source_word], learned.meta.class_name):
        warn(w)
    return report(replace_in_photo(
        backend, learned, args.image, args.source_word, args.out, caption=args.caption, config=config,
        intermediates=args.save_intermediates, progress=not args.quiet, accel=args.accel,
    ))


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
