"""ToyWorld: a small procedural world in which every model the method needs is trained here.

No machine of this project has pretrained weights, so fidelity is measured in a world we can
train from scratch on a CPU: :mod:`hifi.toyworld.world` renders 64x64 scenes with one
toy-like object (class, colour, pattern, mark), its caption and its exact mask;
:mod:`hifi.toyworld.subjects` holds the evaluation subjects (looks never drawn in
training) and writes them in the DreamBooth folder layout. The models themselves (the
``toy`` backend, ToyCLIP, the identity embedder, the segmenter) live in
``hifi_backends.toy`` with the script that trains them.
"""

from hifi.toyworld.subjects import PROMPTS, SUBJECTS, export_dataset, subject_photos
from hifi.toyworld.world import CLASSES, COLOURS, MARKS, PATTERNS, SCENES, Look, Pose, ToyObject, caption, render

__all__ = [
    "CLASSES",
    "COLOURS",
    "MARKS",
    "PATTERNS",
    "PROMPTS",
    "SCENES",
    "SUBJECTS",
    "Look",
    "Pose",
    "ToyObject",
    "caption",
    "export_dataset",
    "render",
    "subject_photos",
]
