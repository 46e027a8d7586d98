"""Architecture configs shipped with the package (no download): SD 1.4 and SD 2.1."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

ARCHITECTURES = ("sd14", "sd21")
COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")


def load_config(architecture: str, component: str) -> dict[str, Any]:
    """The shipped diffusers/transformers config of one component of an architecture."""
    if architecture not in ARCHITECTURES or component not in COMPONENTS:
        raise ValueError(f"no config for {architecture}/{component}")
    text = resources.files(__name__).joinpath(architecture, f"{component}.json").read_text()
    config: dict[str, Any] = json.loads(text)
    return config
