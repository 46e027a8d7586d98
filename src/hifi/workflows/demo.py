"""``hifi demo``: the whole method on a ToyWorld subject (or your photos), in minutes on a CPU.

Takes a ToyWorld subject's photos and exact masks (:mod:`hifi.toyworld`; or a folder of
your photos), tunes on them (Section 3.2), generates each prompt plainly (Eq. 7) and with
reference guidance (Algorithm 2), and writes a grid and a table of subject similarity. The
grid's rows, each labelled with its figure: the photos, their masks, untuned generations of
the class word alone and (a ToyWorld subject) of the subject's exact description, the plain
and the guided generations, and the masks found in the guided ones; small images are
enlarged by a whole factor, pixel for pixel, so that a 64-pixel pattern can be seen. The
subject and prompts are fixed in the code, not chosen from results. On the ``toy``
backend (the default: ToyWorld's model, trained from scratch and bundled) the numbers mean
something; on ``tiny`` (random weights) they only show that every stage runs. With
``--backend sd14 --model PATH --photos DIR`` it is the real thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from hifi.algorithms.generate import generate
from hifi.algorithms.reference import ReferenceSettings, reference_guided_generate
from hifi.algorithms.subject import SUBJECT_SLOT, Subject
from hifi.algorithms.tune import TuneConfig
from hifi.errors import HifiError
from hifi.io.images import (
    atomic_path,
    make_labelled_grid,
    save_image,
    tensor_to_image,
    write_json,
)
from hifi.io.runs import CHECKPOINT_DIR, RUN_FILE, apply_run, load_run
from hifi.kernels.similarity import cosine_similarity_matrix
from hifi.perception.registry import configured_perception
from hifi.protocols.denoiser import DenoiserBackend
from hifi.toyworld.subjects import SUBJECTS, exact_prompt, export_dataset
from hifi.workflows.photos import load_references
from hifi.workflows.tune import tune_to_run

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
        sims = cosine_similarity_matrix(embedder.embed(generated), embedder.embed(sources))
    if exclude_self:
        off = ~torch.eye(sims.shape[0], dtype=torch.bool)
        return float(sims[off].mean())
    return float(sims.mean())


def run_demo(
    out: str | Path,
    backend: DenoiserBackend,
    *,
    photos: str | Path | None = None,
    masks: str | Path | None = None,
    class_name: str | None = None,
    toy_subject: str = "striped_mug",
    config: TuneConfig | None = None,
    prompts: Sequence[str] = DEMO_PROMPTS,
    seeds: Sequence[int] = (0, 1),
    reference: ReferenceSettings | None = None,
    progress: bool = False,
) -> DemoResult:
    """Tune, generate plain and guided, and write ``grid.png`` and ``metrics.md/json``.

    Without ``photos``, the ToyWorld subject ``toy_subject`` is the subject (its photos and
    exact masks are written to ``out/subject``); with ``photos`` (a folder), ``class_name``
    is required and ``masks`` is an optional folder of masks of the same names.
    """
    out = Path(out)
    masks_dir: Path | None
    if photos is None:
        if toy_subject not in SUBJECTS:
            raise HifiError(f"unknown ToyWorld subject {toy_subject!r}; choose from {', '.join(SUBJECTS)}")
        dataset, mask_root = export_dataset(out / "subject", [toy_subject])
        photos_dir, masks_dir = dataset / toy_subject, mask_root / toy_subject
        class_name = class_name or SUBJECTS[toy_subject].cls
    else:
        if not class_name:
            raise HifiError("with your own photos, name their class (--class-name dog)")
        photos_dir, masks_dir = Path(photos), Path(masks) if masks else None
    config = config or TuneConfig(steps=200, stepwise_steps=5, num_steps=20, checkpoint_every=50)
    reference = reference or ReferenceSettings(num_steps=config.num_steps, t_start=16, t_end=4, phi_steps=3)
    run_dir = out / "run"
    if (run_dir / RUN_FILE).exists():
        outcome_warnings: tuple[str, ...] = ("reused the finished tune in " + str(run_dir),)
    else:
        outcome = tune_to_run(backend, photos_dir, class_name, run_dir, config=config, masks=masks_dir,
                              resume=(run_dir / CHECKPOINT_DIR).exists(), samples=0, progress=progress)
        outcome_warnings = outcome.warnings
    run = load_run(run_dir)
    subject = apply_run(run, backend)
    size = backend.resolution
    perception = configured_perception(backend)
    references, ref_warnings = load_references(run, size, perception.embedder)
    sources, source_masks = references.images, references.masks.float()

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
    assert class_name is not None
    untuned = Subject.plain(class_name)  # no subject: the class word alone
    no_subject = torch.cat([generate(backend, untuned, p, list(seeds), num_steps=config.num_steps).images
                            for p in prompts])
    # A ToyWorld subject's exact description ("a red mug with white stripes and a yellow diamond on
    # the beach"), untuned: what the model draws when told everything the subject is made of.
    exact = None
    if photos is None:
        look = SUBJECTS[toy_subject]
        exact = torch.cat([generate(backend, untuned, exact_prompt(p.replace(SUBJECT_SLOT, "{0} {1}"), look),
                                    list(seeds), num_steps=config.num_steps).images for p in prompts])
    with torch.no_grad():
        round_trip = backend.decode_latents(backend.encode_images(sources.to(backend.device, backend.dtype)))
        round_trip = round_trip.float().clamp(-1.0, 1.0)

    embedder = perception.embedder
    similarity = {
        "real images (real vs real, no self-pairs)": _similarity(embedder, sources, sources, exclude_self=True),
        "VAE round trip of the photos (the latent's ceiling)": _similarity(embedder, round_trip, sources,
                                                                          exclude_self=True),
        "no tuning (class word only)": _similarity(embedder, no_subject, sources),
    }
    if exact is not None:
        similarity["no tuning, told the exact description"] = _similarity(embedder, exact, sources)
    similarity["HiFi, plain (Eq. 7)"] = _similarity(embedder, plain_all, sources)
    similarity["HiFi + reference guidance (Algorithm 2)"] = _similarity(embedder, guided_all, sources)
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

    def cells(images: Tensor) -> list[Any]:
        return [tensor_to_image(x) for x in images.cpu()]

    def figure(row: str) -> str:
        return f"{embedder.name} {similarity[row]:.3f}"

    grid_rows = [
        (f"the photos\nreal vs real\n{figure('real images (real vs real, no self-pairs)')}", cells(sources)),
        ("their masks", cells(source_masks)),
        (f"no tuning:\nthe class word\n{figure('no tuning (class word only)')}", cells(no_subject)),
    ]
    if exact is not None:
        grid_rows.append((f"no tuning: told the\nexact description\n{figure('no tuning, told the exact description')}",
                          cells(exact)))
    grid_rows += [
        (f"HiFi, plain (Eq. 7)\n{figure('HiFi, plain (Eq. 7)')}", cells(plain_all)),
        (f"HiFi + reference\nguidance (Alg. 2)\n{figure('HiFi + reference guidance (Algorithm 2)')}",
         cells(guided_all)),
        ("masks found in the\nguided images", [tensor_to_image(m) for m in generated_masks]),
    ]
    cell = size * max(1, 192 // size) if size < 192 else size
    grid = make_labelled_grid(grid_rows, cell=cell, label_width=200)
    save_image(grid, out / "grid.png")
    write_json(out / "metrics.json", metrics)
    with atomic_path(out / "metrics.md") as tmp:
        tmp.write_text(table)
    return DemoResult(out=out, grid=out / "grid.png", table=table, metrics=metrics,
                      warnings=tuple(dict.fromkeys(warnings)))

