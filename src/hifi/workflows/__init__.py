"""Workflows: files in, files out (the floor just under the command line).

Each joins the I/O edge (:mod:`hifi.io`) to the algorithms and never prints: warnings come
back in its result, progress goes to an optional tqdm bar. The command line is a thin layer
over them; an embedding product calls them directly.
"""

from hifi.workflows.edit import PhotoEdit, edit_photo, replace_in_photo
from hifi.workflows.export import ExportResult, export_run
from hifi.workflows.generate import GenerateResult, GenerateSettings, generate_from_run
from hifi.workflows.photos import SubjectPhotos, load_references, load_subject_photos
from hifi.workflows.tune import TuneOutcome, tune_to_run

__all__ = [
    "ExportResult",
    "GenerateResult",
    "GenerateSettings",
    "PhotoEdit",
    "SubjectPhotos",
    "TuneOutcome",
    "edit_photo",
    "export_run",
    "generate_from_run",
    "load_references",
    "load_subject_photos",
    "replace_in_photo",
    "tune_to_run",
]
