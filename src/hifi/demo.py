"""``hifi demo``: the whole method on photos the project draws itself, in minutes on a CPU.

Draws a made-up subject (:mod:`hifi.synthetic`), tunes on it (Section 3.2), generates
each prompt plainly (Eq. 7) and with reference guidance (Algorithm 2), and writes a grid
(sources, masks, plain and guided generations, the generated-image masks) and a table of
subject similarity. On the ``tiny`` backend, whose weights are random, the pictures are
noise-like and the numbers say nothing about the method: the demo shows that every stage
runs and what it writes. With ``--backend sd14 --model PATH`` it is the real thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from hifi.algorithms.generate import generate
from hifi.algorithms.reference import ReferenceSettings, reference_guided_generate
from hifi.algorithms.tune import TuneConfig
from hifi.io import (
    atomic_path,
    make_grid,
    save_image,
    tensor_to_image,
    write_json,
)
from hifi.perception import default_perception
from hifi.protocols import DenoiserBackend
from hifi.runs import apply_run, load_run
from hifi.subject import Subject
from hifi.synthetic import draw_subject_photos
from hifi.workflows import load_references, tune_to_run

__all__ = ["DemoResult", "run_demo"]

DEMO_PROMPTS = ("a <subject> on the beach", "a <subject> in the snow")


@attrs.frozen
class DemoResult:
    out: Path
    grid: Path
    table: str
    metrics: dict[str, Any]
    warnings: tuple[str, ...]


def _similarity(embedder: Any, generated: Tensor, sources: Tensor, exclude_self: bool = False) -> float:
    """Mean pairwise cosine of embeddings, generated vs sources (the DINO-score recipe)."""
    with torch.no_grad():
        a = F.normalize(embedder.embed(generated).float(), dim=-1)
        b = F.normalize(embedder.embed(sources).float(), dim=-1)
    sims = a @ b.T
    if exclude_self:
        off = ~torch.eye(sims.shape[0], dtype=torch.bool)
        return float(sims[off].mean())
    return float(sims.mean())


def run_demo(
    out: str | Path,
    backend: DenoiserBackend,
    *,
    class_name: str = "toy",
    config: TuneConfig | None = None,
    prompts: Sequence[str] = DEMO_PROMPTS,
    seeds: Sequence[int] = (0, 1),
    reference: ReferenceSettings | None = None,
    progress: bool = False,
) -> DemoResult:
    """Draw, tune, generate plain and guided, and write ``grid.png`` and ``metrics.md/json``."""
    out = Path(out)
    config = config or TuneConfig(steps=200, stepwise_steps=5, num_steps=20, checkpoint_every=50)
    reference = reference or ReferenceSettings(num_steps=config.num_steps, t_start=16, t_end=4, phi_steps=3)
    photos_dir, masks_dir = draw_subject_photos(out / "subject", n=4)
    run_dir = out / "run"
    if (run_dir / "run.json").exists():
        outcome_warnings: tuple[str, ...] = ("reused the finished tune in " + str(run_dir),)
    else:
        outcome = tune_to_run(backend, photos_dir, class_name, run_dir, config=config, masks=masks_dir,
                              resume=(run_dir / "checkpoint").exists(), samples=0, progress=progress)
        outcome_warnings = outcome.warnings
    run = load_run(run_dir)
    subject = apply_run(run, backend)
    size = backend.resolution
    perception = default_perception(backend)
    references, ref_warnings = load_references(run, size, perception.embedder)
    sources, masks = references.images, references.masks.float()

    warnings = list(outcome_warnings) + ref_warnings
    plain, guided, generated_masks = [], [], []
    for prompt in prompts:
        row, first = [], []
        for seed in seeds:
            result = reference_guided_generate(backend, subject, prompt, seed, references, perception,
                                               settings=reference, progress=progress)
            warnings.extend(result.warnings)
            first.append(result.first.image[0])  # step 1 of Algorithm 2 is the plain Eq. 7 image
            row.append(result.image)
            mask = result.generated_mask
            generated_masks.append(torch.zeros(size, size) if mask is None else mask.float().cpu())
        guided.append(torch.stack(row))
        plain.append(torch.stack(first))
    plain_all, guided_all = torch.cat(plain), torch.cat(guided)
    untuned = Subject(class_name=class_name, mode="dreambooth")  # no subject: the class word alone
    no_subject = torch.cat([generate(backend, untuned, p.replace("<subject>", class_name), list(seeds),
                                     num_steps=config.num_steps).images for p in prompts])

    embedder = perception.embedder
    similarity = {
        "real images (real vs real, no self-pairs)": _similarity(embedder, sources, sources, exclude_self=True),
        "no tuning (class word only)": _similarity(embedder, no_subject, sources),
        "HiFi, plain (Eq. 7)": _similarity(embedder, plain_all, sources),
        "HiFi + reference guidance (Algorithm 2)": _similarity(embedder, guided_all, sources),
    }
    metrics: dict[str, Any] = {
        "embedder": embedder.name,
        "backend": backend.name,
        "model_id": backend.model_id,
        "rows": similarity,
        "prompts": list(prompts),
        "seeds": list(seeds),
        "fallbacks": sum(1 for w in warnings if "plain generation" in w),
    }
    lines = [
        f"Subject similarity (mean cosine of `{embedder.name}` embeddings to the source photos),"
        f" backend `{backend.name}` ({backend.model_id}).",
        "",
        "| row | similarity |",
        "| --- | ---: |",
    ] + [f"| {k} | {v:.3f} |" for k, v in similarity.items()]
    if backend.model_id.startswith("random:"):
        lines += ["", "Random weights: these numbers show the pipeline runs, not that the method works."]
    table = "\n".join(lines) + "\n"

    blank = tensor_to_image(torch.ones(size, size))
    rows = [
        [tensor_to_image(x) for x in sources],
        [tensor_to_image(m) for m in masks.cpu()],
        [tensor_to_image(x) for x in plain_all],
        [tensor_to_image(x) for x in guided_all],
        [tensor_to_image(m) for m in generated_masks],
    ]
    cols = max(len(r) for r in rows)
    padded = [cell for r in rows for cell in r + [blank] * (cols - len(r))]
    grid = make_grid(padded, cols=cols, cell=max(64, size))
    save_image(grid, out / "grid.png")
    write_json(out / "metrics.json", metrics)
    with atomic_path(out / "metrics.md") as tmp:
        tmp.write_text(table)
    return DemoResult(out=out, grid=out / "grid.png", table=table, metrics=metrics,
                      warnings=tuple(dict.fromkeys(warnings)))

