"""``hifi export``: write a run in the layout AUTOMATIC1111, ComfyUI, kohya's sd-scripts or diffusers reads.

The workflow is :func:`hifi.workflows.export.export_run`; its module docstring holds the
table of what each mode and format writes, or why not.
"""

from __future__ import annotations

import argparse
from typing import Any

from hifi.workflows.export import FORMATS, export_run


def run(args: argparse.Namespace) -> int:
    result = export_run(args.run, args.format, args.out)
    for path in result.files:
        print(f"wrote {path}")
    print(result.note)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="write a run for AUTOMATIC1111, ComfyUI, kohya's sd-scripts or diffusers")
    p.add_argument("run", metavar="RUN", help="run folder written by `hifi tune`")
    p.add_argument("--format", required=True, metavar="FORMAT", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True,
                   help="diffusers: a folder; a1111, comfyui, kohya: NAME.safetensors (NAME is the trigger word)")
    p.set_defaults(func=run)
