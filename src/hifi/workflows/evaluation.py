"""The DreamBooth evaluation protocol (Section 4): tune per subject, generate, score.

For each subject: tune with the chosen method, draw ``images_per_prompt`` images for each
of its prompts (the object or live-subject list of ``prompts_and_classes.txt``), and score
them as the DreamBooth paper defines the metrics:

- DINO: mean pairwise cosine of DINO ViT-S/16 CLS embeddings, generated vs real photos;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: cosine of the prompt's CLIP text embedding and the image's CLIP embedding (the
  prompt as the user reads it, with the class word where the subject goes).

The "real images" row compares real photos with each other (self-pairs excluded). Reference
guidance is applied to the 21 objects only, as in the paper.

Everything is resumable: a finished tune, image or score on disk is not done again. Under
``torchrun`` the subjects are sharded over ranks and rank 0 merges the tables; the merged
tables equal a single process's (each subject's work depends on nothing but its seed).
"""

from __future__ import annotations

import csv
import io
import math
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from hifi.algorithms.generate import generate
from hifi.algorithms.reference import ReferenceSettings, reference_guided_generate_many
from hifi.algorithms.subject import SUBJECT_SLOT, Subject
from hifi.algorithms.tune import TuneConfig
from hifi.errors import HifiError
from hifi.execution.edge import execution_for
from hifi.io.images import (
    atomic_path,
    image_to_tensor,
    list_images,
    load_image,
    make_grid,
    save_image,
    tensor_to_image,
    write_json,
)
from hifi.io.runs import CHECKPOINT_DIR, RUN_FILE, apply_run, load_run
from hifi.kernels.similarity import unit_rows
from hifi.perception.registry import configured_perception
from hifi.protocols.denoiser import DenoiserBackend
from hifi.workflows.photos import load_references
from hifi.workflows.tune import tune_to_run

__all__ = [
    "METHODS",
    "Dataset",
    "EvalSettings",
    "Method",
    "Scorers",
    "evaluate",
    "load_dreambooth",
    "summarise",
]

LIVE_CLASSES = ("cat", "dog")


@attrs.frozen
class Method:
    """One row of Table 1 / Table 2: how to tune and whether to guide with a reference."""

    name: str
    description: str
    mode: str | None  # None: no tuning (or the real-images row)
    use_mask: bool = True
    reg_weight: float = 1e-4
    stepwise: bool = True
    reference: bool = False
    lora_rank: int | None = None  # dreambooth: LoRA adapters of this rank instead of the whole UNet

    @property
    def lr_key(self) -> str:
        """The key of this row's learning rate in :attr:`EvalSettings.learning_rates` (LoRA has its own)."""
        return f"{self.mode}-lora" if self.lora_rank else str(self.mode or "")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("real", "Real images (real vs real)", None),
    Method("no-tuning", "No tuning (the class word alone)", None),
    Method("ti", "Textual Inversion (classic, Eq. 2)", "classic-ti", use_mask=False, stepwise=False),
    Method("ti-mask", "+ mask (Eq. 5)", "classic-ti", use_mask=True, stepwise=False),
    Method("hifi-reg", "+ regularization (Eq. 6: c_s from phi_s)", "hifi", stepwise=False),
    Method("hifi-stepwise", "+ step-wise representations (Algorithm 1)", "hifi"),
    Method("hifi", "+ reference guidance (Algorithm 2): HiFi Tuner", "hifi", reference=True),
    Method("dreambooth", "DreamBooth", "dreambooth", use_mask=False, stepwise=False),
    Method("dreambooth-ref", "DreamBooth + reference guidance", "dreambooth", use_mask=False, stepwise=False,
           reference=True),
    Method("dreambooth-lora", "DreamBooth, LoRA rank 4", "dreambooth", use_mask=False, stepwise=False, lora_rank=4),
)}


@attrs.frozen
class Dataset:
    """The DreamBooth set: subject -> class, and the two prompt lists as ``<subject>`` templates."""

    root: Path
    classes: dict[str, str]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]

    def is_live(self, subject: str) -> bool:
        return self.classes[subject] in LIVE_CLASSES

    def prompts(self, subject: str) -> tuple[str, ...]:
        return self.live_prompts if self.is_live(subject) else self.object_prompts


def load_dreambooth(root: str | Path) -> Dataset:
    """Parse ``prompts_and_classes.txt`` of a DreamBooth-layout folder."""
    root = Path(root)
    spec = root / "prompts_and_classes.txt"
    if not spec.exists():
        raise HifiError(f"{root} is not a DreamBooth dataset folder: {spec.name} is missing")
    text = spec.read_text()
    classes = dict(re.findall(r"^([a-z0-9_]+),([a-z ]+)$", text, flags=re.M))
    classes.pop("subject_name", None)
    lists = re.findall(r"prompt_list = \[(.*?)\]", text, flags=re.S)
    if len(lists) != 2 or not classes:
        raise HifiError(f"{spec} does not have the expected classes and two prompt lists")

    def templates(block: str) -> tuple[str, ...]:
        return tuple(p.replace("{0} {1}", SUBJECT_SLOT) for p in re.findall(r"'(.*?)'\.format", block))

    return Dataset(root=root, classes=classes, object_prompts=templates(lists[0]), live_prompts=templates(lists[1]))


@attrs.frozen
class EvalSettings:
    method: str = "hifi"
    subjects: tuple[str, ...] = ()
    prompts: int | None = None
    images_per_prompt: int = 4
    steps: int | None = None
    stepwise_steps: int = 10
    num_steps: int = 50
    seed: int = 0
    masks: str = "none"
    reference: ReferenceSettings = ReferenceSettings()
    learning_rates: tuple[tuple[str, float], ...] = ()
    """Per tuning mode (:attr:`Method.lr_key`: ``dreambooth-lora`` for LoRA rows), a learning rate other than
    the mode's default (e.g. ``(("dreambooth", 5e-5),)``)."""
    accel: str = "eager"
    """How the fixed-shape steps run (:func:`hifi.execution.edge.execution_for`): the tunes, the
    generations and the reference-guided loops; the results do not depend on it beyond rounding."""
    batch_size: int = 4
    """Up to this many seeds of a prompt drawn (and reference-guided) as one batch; each image as if alone."""

    def tune_config(self, method: Method) -> TuneConfig:
        assert method.mode is not None
        return TuneConfig(
            mode=method.mode,  # type: ignore[arg-type]
            steps=self.steps, lr=dict(self.learning_rates).get(method.lr_key), lora_rank=method.lora_rank,
            use_mask=method.use_mask, reg_weight=method.reg_weight,
            stepwise_steps=self.stepwise_steps if method.stepwise else 0, num_steps=self.num_steps, seed=self.seed,
        )


class Scorers:
    """The metric models: DINO and CLIP embedders (``embed(images)``; CLIP also ``embed_text``).

    Features come back as unit rows on the CPU, so that a dot product of two is their cosine.
    """

    def __init__(self, dino: Any, clip: Any) -> None:
        self.dino, self.clip = dino, clip

    def image_features(self, images: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            return {"dino": unit_rows(self.dino.embed(images).cpu()), "clip": unit_rows(self.clip.embed(images).cpu())}

    def text_features(self, texts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            return unit_rows(self.clip.embed_text(list(texts)).cpu())


SCORE_FIELDS = ("method", "subject", "class", "prompt_index", "prompt", "seed", "image", "dino", "clip_i", "clip_t")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _real_photos(dataset: Dataset, subject: str, size: int) -> tuple[list[Path], Tensor]:
    files = list_images(dataset.root / subject)
    return files, torch.stack([image_to_tensor(load_image(f), size) for f in files])


def _reuse_equivalent_run(out: Path, method: Method, subject: str, settings: EvalSettings, run_dir: Path) -> None:
    """Copy a finished run of another row that tunes exactly alike (``hifi-stepwise`` and ``hifi``,
    ``dreambooth`` and ``dreambooth-ref`` differ only at generation), instead of tuning again."""
    wanted = settings.tune_config(method)
    for other in METHODS.values():
        if other.name == method.name or other.mode is None or settings.tune_config(other) != wanted:
            continue
        source = out / other.name / subject / "run"
        if (source / RUN_FILE).exists():
            tmp = run_dir.with_name(run_dir.name + ".copying")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(CHECKPOINT_DIR))
            tmp.rename(run_dir)
            return


def _evaluate_subject(
    backend_for: Callable[[], DenoiserBackend],
    dataset: Dataset,
    subject_name: str,
    settings: EvalSettings,
    scorers: Scorers,
    out: Path,
    progress: bool,
) -> list[dict[str, Any]]:
    """Tune, generate and score one subject; resumable through the files it writes."""
    method = METHODS[settings.method]
    folder = out / method.name / subject_name
    scores_file = folder / "scores.csv"
    if scores_file.exists():
        return [dict(r) for r in _read_csv(scores_file)]
    class_name = dataset.classes[subject_name]
    backend = backend_for()
    execution = execution_for(backend, settings.accel)  # one per subject's backend: graphs captured once
    model = execution.model(backend.denoise)
    files, real = _real_photos(dataset, subject_name, backend.resolution)
    real_feats = scorers.image_features(real)
    rows: list[dict[str, Any]] = []
    base = {"method": method.name, "subject": subject_name, "class": class_name}
    if method.name == "real":
        n = len(files)
        for i, f in enumerate(files):
            others = [j for j in range(n) if j != i]
            rows.append({**base, "prompt_index": "", "prompt": "", "seed": "", "image": str(f),
                         "dino": float((real_feats["dino"][i] @ real_feats["dino"][others].T).mean()),
                         "clip_i": float((real_feats["clip"][i] @ real_feats["clip"][others].T).mean()),
                         "clip_t": ""})
        _write_csv(scores_file, rows, SCORE_FIELDS)
        return rows

    if method.mode is None:
        subject = Subject.plain(class_name)  # the bare class word
    else:
        run_dir = folder / "run"
        if not (run_dir / RUN_FILE).exists():
            _reuse_equivalent_run(out, method, subject_name, settings, run_dir)
        if not (run_dir / RUN_FILE).exists():
            masks = settings.masks
            if masks not in ("none", "auto"):
                masks = str(Path(masks) / subject_name)
            tune_to_run(backend, dataset.root / subject_name, class_name, run_dir,
                        config=settings.tune_config(method), masks=masks,
                        resume=(run_dir / CHECKPOINT_DIR).exists(), samples=0, progress=progress,
                        accel=settings.accel)
        subject = apply_run(load_run(run_dir), backend)
    guide = method.reference and not dataset.is_live(subject_name)
    if guide:
        perception = configured_perception(backend)
        references, _ = load_references(load_run(folder / "run"), backend.resolution, perception.embedder)
    prompts = dataset.prompts(subject_name)[: settings.prompts]
    seeds = [settings.seed * 10_000 + k for k in range(settings.images_per_prompt)]
    text_feats = scorers.text_features([p.replace(SUBJECT_SLOT, class_name) for p in prompts])
    images_for_grid = []
    for pi, prompt in enumerate(prompts):
        paths = {seed: folder / "images" / f"p{pi:02d}_s{seed}.png" for seed in seeds}
        missing = [seed for seed in seeds if not paths[seed].exists()]
        drawn: dict[int, Tensor] = {}
        for start in range(0, len(missing), settings.batch_size):  # a prompt's seeds in batches
            chunk = missing[start : start + settings.batch_size]
            if guide:
                made = [r.image.cpu() for r in reference_guided_generate_many(
                    backend, subject, prompt, chunk, references, perception, settings=settings.reference,
                    model=model, optimiser=execution.runner)]
            else:
                made = list(generate(backend, subject, prompt, chunk, num_steps=settings.num_steps,
                                     model=model).images.cpu())
            for seed, image in zip(chunk, made, strict=True):
                save_image(tensor_to_image(image), paths[seed])
                drawn[seed] = image
        for seed in seeds:
            path = paths[seed]
            image = drawn[seed] if seed in drawn else image_to_tensor(load_image(path), backend.resolution)
            feats = scorers.image_features(image[None])
            rows.append({**base, "prompt_index": pi, "prompt": prompt.replace(SUBJECT_SLOT, class_name),
                         "seed": seed, "image": str(path.relative_to(out)),
                         "dino": float((feats["dino"] @ real_feats["dino"].T).mean()),
                         "clip_i": float((feats["clip"] @ real_feats["clip"].T).mean()),
                         "clip_t": float(feats["clip"][0] @ text_feats[pi])})
            images_for_grid.append(tensor_to_image(image))
    real_cells = [tensor_to_image(x) for x in real]
    cols = max(len(real_cells), len(seeds))
    save_image(make_grid(real_cells + images_for_grid, cols=cols, cell=min(256, backend.resolution)),
               out / method.name / f"{subject_name}.grid.png")
    _write_csv(scores_file, rows, SCORE_FIELDS)
    return rows


def _interval(values: Sequence[float], seed: int = 0, resamples: int = 2000) -> tuple[float, float, float]:
    """Mean and a 95% bootstrap percentile interval (deterministic)."""
    t = torch.tensor(values, dtype=torch.float64)
    if t.numel() == 1:
        return float(t), float(t), float(t)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, t.numel(), (resamples, t.numel()), generator=g)
    means = t[idx].mean(dim=1).sort().values
    return float(t.mean()), float(means[int(0.025 * resamples)]), float(means[int(0.975 * resamples) - 1])


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-subject means and the overall mean with a 95% interval over subjects, per metric."""
    metrics = ("dino", "clip_i", "clip_t")
    per_subject: dict[str, dict[str, float]] = {}
    for subject in sorted({r["subject"] for r in rows}):
        mine = [r for r in rows if r["subject"] == subject]
        per_subject[subject] = {}
        for m in metrics:
            vals = [float(r[m]) for r in mine if r[m] not in ("", None)]
            if vals:
                per_subject[subject][m] = sum(vals) / len(vals)
    overall: dict[str, Any] = {}
    for m in metrics:
        vals = [s[m] for s in per_subject.values() if m in s]
        if vals:
            mean, lo, hi = _interval(vals)
            overall[m] = {"mean": mean, "ci95": [lo, hi], "subjects": len(vals)}
    method = rows[0]["method"] if rows else ""
    return {"method": method, "per_subject": per_subject, "overall": overall, "images": len(rows)}


def summary_markdown(summary: dict[str, Any]) -> str:
    method = METHODS.get(summary["method"])
    title = method.description if method else summary["method"]
    lines = [f"# {title} (`{summary['method']}`)", "", "| subject | DINO | CLIP-I | CLIP-T |",
             "| --- | ---: | ---: | ---: |"]

    def fmt(x: float | None) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    for subject, vals in summary["per_subject"].items():
        lines.append(f"| {subject} | {fmt(vals.get('dino'))} | {fmt(vals.get('clip_i'))} | {fmt(vals.get('clip_t'))} |")
    cells = []
    for m in ("dino", "clip_i", "clip_t"):
        o = summary["overall"].get(m)
        cells.append("n/a" if o is None else f"{o['mean']:.3f} [{o['ci95'][0]:.3f}, {o['ci95'][1]:.3f}]")
    lines.append(f"| **all ({len(summary['per_subject'])} subjects)** | {' | '.join(cells)} |")
    lines += ["", "Mean over subjects; brackets: 95% bootstrap interval over subjects."]
    return "\n".join(lines) + "\n"


def evaluate(
    dataset: Dataset,
    backend_for: Callable[[], DenoiserBackend],
    scorers: Scorers,
    out: str | Path,
    settings: EvalSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[list[dict[str, Any]]], list[list[dict[str, Any]]] | None] | None = None,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Run the protocol for this rank's share of the subjects; rank 0 writes the merged tables.

    ``backend_for()`` builds a fresh backend per subject (DreamBooth changes its weights).
    ``gather(rows)`` collects every rank's rows on rank 0 (None elsewhere); with one process
    it is the identity. Returns the summary on rank 0, None on the other ranks.
    """
    if settings.method not in METHODS:
        raise HifiError(f"unknown method {settings.method!r}; choose from {', '.join(METHODS)}")
    subjects = settings.subjects or tuple(sorted(dataset.classes))
    unknown = [s for s in subjects if s not in dataset.classes]
    if unknown:
        raise HifiError(f"unknown subjects {', '.join(unknown)}; known: {', '.join(sorted(dataset.classes))}")
    out = Path(out)
    mine = subjects[rank::world_size]
    rows: list[dict[str, Any]] = []
    for name in mine:
        rows.extend(_evaluate_subject(backend_for, dataset, name, settings, scorers, out, progress))
    gathered = gather(rows) if gather is not None else [rows]
    if gathered is None:
        return None
    merged = sorted((r for part in gathered for r in part), key=lambda r: (r["subject"], str(r["prompt_index"]),
                                                                          str(r["seed"])))
    folder = out / settings.method
    _write_csv(folder / "scores.csv", merged, SCORE_FIELDS)
    summary = summarise(merged)
    summary["settings"] = {**attrs.asdict(settings), "subjects": list(subjects)}
    write_json(folder / "summary.json", summary)
    with atomic_path(folder / "summary.md") as tmp:
        tmp.write_text(summary_markdown(summary))
    return summary

