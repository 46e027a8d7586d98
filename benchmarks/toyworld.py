"""ToyWorld measurements: the model check (issue: ToyWorld) and the paper's tables (Table 1 / Table 2).

    python -m benchmarks.toyworld check  --out benchmarks/results/toyworld-model
    python -m benchmarks.toyworld tables --out benchmarks/results/toyworld-tables

``check``: does the bundled model follow prompts (ToyCLIP zero-shot scene and class of
generated images, beside the same classifier on renders), does it draw the prompted colour,
pattern and mark (the segmenter and the detail classifier, no ToyCLIP), and what does it
show of each subject without the method (the reference rows: real vs real, the photos' VAE
round trips, untuned generations told the exact description or the class word, other
subjects' photos)?

``tables``: every row of Table 1 and Table 2 through ``hifi eval``'s library API on the
ToyWorld subjects, with the world's identity metric (DINO's role), ToyCLIP-I and ToyCLIP-T,
mean and 95% bootstrap interval over (subject, seed) cells, beside the reference rows (the
exact description, untuned, and the VAE round trip: one cell per subject); on ToyWorld also
each row's pattern and mark following (the share of images in which the detail classifier
reads the subject's own pattern and mark, each in its colour); a plot; and each row's grid
for two subjects. Step counts are scaled down for this world and equal across rows.
Both are resumable (the evaluation's files are reused) and write atomically.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from hifi.algorithms.reference import ReferenceSettings
from hifi.algorithms.tune_loop import DEFAULT_LORA_LR
from hifi.errors import HifiError, ModelNotFoundError
from hifi.io.images import atomic_path, image_to_tensor, list_images, load_image, write_json
from hifi.perception.registry import load_embedder
from hifi.registry import load_backend
from hifi.toyworld.subjects import SUBJECTS, export_dataset
from hifi.workflows.evaluation import METHODS, EvalSettings, Scorers, evaluate, load_dreambooth
from hifi_backends.toy.quality import bootstrap

TABLE1 = ("real", "no-tuning", "ti", "hifi", "dreambooth", "dreambooth-ref")
TABLE2 = ("ti", "ti-mask", "hifi-reg", "hifi-stepwise", "hifi", "dreambooth", "dreambooth-ref", "dreambooth-lora")
ROWS = tuple(dict.fromkeys(TABLE1 + TABLE2))
METRICS = ("dino", "clip_i", "clip_t")
METRIC_NAMES = {"dino": "identity (DINO's role)", "clip_i": "ToyCLIP-I", "clip_t": "ToyCLIP-T"}
DETAILS = ("pattern", "mark")
"""On ToyWorld, each row's images are also read by the detail classifier: the share of a cell's images with the
subject's pattern in its colour, and with its mark in its colour (:func:`hifi_backends.toy.quality.detail_hits`)."""
DETAIL_NAMES = {"pattern": "the subject's pattern", "mark": "the subject's mark"}


@attrs.frozen
class TableSettings:
    """The scaled-down protocol, equal for every row."""

    subjects: tuple[str, ...] = tuple(SUBJECTS)
    prompts: int = 6
    images_per_prompt: int = 2
    seeds: tuple[int, ...] = (0, 1)  # tuning seeds: each (subject, seed) is a cell of the intervals
    steps: int | None = 200  # c_s / TI token / DreamBooth steps (None: each method's own)
    dreambooth_lr: float | None = 5e-5  # SD's 5e-6 barely moves a from-scratch 4M UNet in 200 steps
    stepwise_steps: int = 3  # I of Algorithm 1, per timestep
    ddim_steps: int = 20
    t_start: int = 16
    t_end: int = 4
    phi_steps: int = 3




def _cells(rows: Sequence[dict[str, Any]], metric: str) -> dict[tuple[str, str], float]:
    """One value per (subject, seed) cell: the mean over that cell's prompts and images."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.get(metric) in ("", None):
            continue
        groups.setdefault((r["subject"], str(r.get("eval_seed", ""))), []).append(float(r[metric]))
    return {cell: statistics.fmean(v) for cell, v in groups.items()}


def _interval(cells: dict[tuple[str, str], float]) -> dict[str, Any]:
    """Mean and 95% bootstrap interval over cells, and each subject's mean over its seeds."""
    mean, lo, hi = bootstrap(list(cells.values()))
    by_subject: dict[str, list[float]] = {}
    for (subject, _), value in cells.items():
        by_subject.setdefault(subject, []).append(value)
    return {"mean": mean, "ci95": [lo, hi], "cells": len(cells),
            "per_subject": {n: statistics.fmean(v) for n, v in by_subject.items()}}


def _read_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


PAPER = TableSettings(subjects=(), prompts=25, images_per_prompt=4, seeds=(0,), steps=None, dreambooth_lr=None,
                      stepwise_steps=10, ddim_steps=50, t_start=40, t_end=10, phi_steps=10)
"""The paper's protocol (Section 4): all subjects and prompts, 4 images each, each method's own steps."""


def run_tables(out: str | Path, settings: TableSettings = TableSettings(), *, model: str | None = None,
               rows: Sequence[str] = ROWS, progress: bool = False, dataset: str | Path | None = None,
               backend: str = "toy", masks: str | None = None, device: str | None = None,
               work: str | Path | None = None) -> dict[str, Any]:
    """Evaluate every row and write tables, plot and grids to ``out``.

    By default on the ToyWorld subjects with the bundled model. With ``dataset`` (a
    DreamBooth-layout folder), ``backend`` and ``model`` it is the real protocol: e.g. the
    DreamBooth set with ``sd14-fp16`` and SD 1.4 weights, ``masks="auto"`` (Grounded SAM),
    DINO and CLIP as the metrics (the backend's own perception models otherwise).
    ``work`` (default ``out/work``) holds the runs, images and scores; processes evaluating
    different subjects can share it, and a last run over all of them reuses their work.
    """
    from hifi.registry import backend_perception_defaults

    out = Path(out)
    work = Path(work) if work else out / "work"
    if dataset is None:
        # Every subject, whichever are evaluated: processes sharing a work folder write the same files.
        dataset_dir, masks_dir = export_dataset(work / "data", list(SUBJECTS))
        mask_option = str(masks_dir)
    else:
        dataset_dir, mask_option = Path(dataset), masks or "none"
    loaded = load_dreambooth(dataset_dir)
    if not settings.subjects:
        settings = attrs.evolve(settings, subjects=tuple(sorted(loaded.classes)))
    prefs = backend_perception_defaults(backend)
    own = set(prefs.values())
    identity, clip = prefs.get("embedder", "dino"), prefs.get("clip", "clip")
    scorers = Scorers(load_embedder(identity, model=model if identity in own else None, device=device),
                      load_embedder(clip, model=model if clip in own else None, device=device))

    def backend_for() -> Any:
        options: dict[str, Any] = {"model": model} if model else {}
        return load_backend(backend, **options, **({"device": device} if device else {}))
    reference = ReferenceSettings(num_steps=settings.ddim_steps, t_start=settings.t_start, t_end=settings.t_end,
                                  phi_steps=settings.phi_steps)
    detail = _detail_reader(model, device) if dataset is None and backend == "toy" else None
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for row in rows:
        collected: list[dict[str, Any]] = []
        images: dict[tuple[str, int], list[Path]] = {}
        began = time.time()
        for seed in settings.seeds:
            eval_settings = EvalSettings(
                method=row, subjects=settings.subjects, prompts=settings.prompts,
                images_per_prompt=settings.images_per_prompt, steps=settings.steps,
                stepwise_steps=settings.stepwise_steps, num_steps=settings.ddim_steps, seed=seed,
                masks=mask_option, reference=reference,
                learning_rates=(("dreambooth", settings.dreambooth_lr),) if settings.dreambooth_lr else (),
            )
            folder = work / f"seed{seed}"
            evaluate(loaded, backend_for, scorers, folder, eval_settings, progress=progress)
            for r in _read_rows(folder / row / "scores.csv"):
                collected.append({**r, "eval_seed": seed})
                images.setdefault((r["subject"], seed), []).append(folder / r["image"])
        results[row] = {}
        for metric in METRICS:
            cells = _cells(collected, metric)
            if cells:
                results[row][metric] = _interval(cells)
        if detail is not None:
            results[row].update(_details(images, detail))
        timings[row] = round(time.time() - began, 1)
    results["other-subjects"] = _other_subjects(dataset_dir, settings.subjects, scorers,
                                                size=64 if dataset is None else 256)
    if dataset is None and backend == "toy":
        results.update(_reference(work, settings, backend_for(), scorers, detail))
    summary = {
        "settings": attrs.asdict(settings),
        "backend": backend,
        "dataset": str(dataset) if dataset else "ToyWorld subjects",
        "model": model or ("bundled ToyWorld model" if backend == "toy" else None),
        "rows": results,
        "seconds": timings,
        "table1": list(TABLE1),
        "table2": list(TABLE2),
    }
    write_json(out / "tables.json", summary)
    with atomic_path(out / "tables.md") as tmp:
        tmp.write_text(tables_markdown(summary))
    _plot(summary, out / "tables.png")
    for subject in settings.subjects[:2]:
        for row in rows:
            grid = work / f"seed{settings.seeds[0]}" / row / f"{subject}.grid.png"
            if grid.exists():
                (out / "grids").mkdir(parents=True, exist_ok=True)
                with atomic_path(out / "grids" / f"{subject}.{row}.png") as tmp:
                    shutil.copyfile(grid, tmp)
    return summary


REFERENCE = {"exact": "No tuning, told the subject's exact description (reference)",
             "vae": "VAE round trip of the photos (the latent's ceiling, reference)"}
"""The tables' reference rows on ToyWorld (:func:`hifi_backends.toy.quality.reference_rows`)."""


def _reference(work: Path, settings: TableSettings, backend: Any, scorers: Scorers,
               detail: Any = None) -> dict[str, Any]:
    """The reference rows for the tables' subjects, prompts and image seeds (one cell per subject), with their
    pattern and mark following when ``detail`` reads them; cached in ``work/reference.json`` for the settings
    they were measured under."""
    import json

    from hifi.toyworld.subjects import PROMPTS
    from hifi_backends.toy.quality import reference_rows

    seeds = [s * 10_000 + k for s in settings.seeds for k in range(settings.images_per_prompt)]
    key = {"subjects": list(settings.subjects), "prompts": settings.prompts, "seeds": seeds,
           "ddim_steps": settings.ddim_steps, "details": detail is not None}
    cache = work / "reference.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return dict(saved["rows"])
    report = reference_rows(backend, scorers, subjects=settings.subjects, templates=PROMPTS[: settings.prompts],
                            seeds=seeds, num_steps=settings.ddim_steps, detail=detail)
    rows = {name: {**report.rows[name], **{m: {k: e[k] for k in ("mean", "ci95", "cells", "per_subject")}
                                             for m, e in report.detail.get(name, {}).items()}}
            for name in REFERENCE}  # the detail report's names: "exact" and "vae" (beside "photos")
    write_json(cache, {"key": key, "rows": rows})
    return rows


def _detail_reader(model: str | None, device: str | None) -> Any:
    """The ToyWorld detail classifier, or None for a ToyWorld folder from before it (no detail columns)."""
    from hifi_backends.toy.perception import build_toy_detail

    try:
        return build_toy_detail(model=model, device=device)
    except ModelNotFoundError:
        return None


def _details(images: dict[tuple[str, int], list[Path]], detail: Any) -> dict[str, Any]:
    """:data:`DETAILS` of one row: per (subject, seed) cell, the share of its images in which ``detail`` reads
    the subject's pattern and its mark (each in its colour); mean and 95% bootstrap interval over cells."""
    from hifi_backends.toy.quality import detail_hits

    cells: dict[str, dict[tuple[str, str], float]] = {m: {} for m in DETAILS}
    for (subject, seed), paths in images.items():
        batch = torch.stack([image_to_tensor(load_image(p), 64) for p in paths])
        hits = detail_hits(detail.read(batch), [SUBJECTS[subject]] * len(paths))
        for m in DETAILS:
            cells[m][subject, str(seed)] = statistics.fmean(hits[m])
    return {m: _interval(v) for m, v in cells.items() if v}


def _other_subjects(dataset_dir: Path, subjects: Sequence[str], scorers: Scorers, size: int = 64) -> dict[str, Any]:
    """Each subject's photos against every *other* subject's photos: the floor of the identity metrics."""
    feats = {}
    for s in subjects:
        images = torch.stack([image_to_tensor(load_image(f), size) for f in list_images(dataset_dir / s)])
        feats[s] = scorers.image_features(images)
    out: dict[str, Any] = {}
    for metric, key in (("dino", "dino"), ("clip_i", "clip")):
        cells = []
        for s in subjects:
            others = [o for o in subjects if o != s]
            if others:
                sims = [float((feats[s][key] @ feats[o][key].T).mean()) for o in others]
                cells.append(statistics.fmean(sims))
        if cells:
            mean, lo, hi = bootstrap(cells)
            out[metric] = {"mean": mean, "ci95": [lo, hi], "cells": len(cells)}
    return out


def _fmt(entry: dict[str, Any] | None, share: bool = False) -> str:
    if not entry:
        return "n/a"
    if share:
        return f"{entry['mean']:.0%} [{entry['ci95'][0]:.0%}, {entry['ci95'][1]:.0%}]"
    return f"{entry['mean']:.3f} [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"


def tables_markdown(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    rows = summary["rows"]
    details = [m for m in DETAILS if any(m in r for r in rows.values())]
    head = ["| row | " + " | ".join([METRIC_NAMES[m] for m in METRICS] + [DETAIL_NAMES[m] for m in details]) + " |",
            "| --- |" + " ---: |" * (len(METRICS) + len(details))]

    def cells(entry: dict[str, Any]) -> str:
        return " | ".join([_fmt(entry.get(m)) for m in METRICS] + [_fmt(entry.get(m), share=True) for m in details])

    def table(names: Sequence[str]) -> list[str]:
        lines = list(head)
        for name in names:
            label = METHODS[name].description if name in METHODS else REFERENCE.get(name, name)
            lines.append(f"| {label} (`{name}`) | {cells(rows.get(name, {}))} |")
        return lines

    steps = (f"{s['steps']} tuning steps" if s["steps"] else "each method's default tuning steps (c_s and TI 1000,"
             " DreamBooth 400)")
    lr = (f"DreamBooth at lr {s['dreambooth_lr']:g}" if s["dreambooth_lr"] else "DreamBooth at lr 5e-6")
    lr += f", its LoRA at {DEFAULT_LORA_LR:g}"
    lines = [
        f"# The paper's tables, measured ({summary.get('dataset', 'ToyWorld subjects')},"
        f" backend `{summary.get('backend', 'toy')}`)",
        "",
        f"{len(s['subjects'])} subjects ({', '.join(s['subjects'])}), first {s['prompts']} of the 25 prompts,"
        f" {s['images_per_prompt']} images per prompt, seeds {list(s['seeds'])}. Every row: {steps}"
        f" ({lr}; c_s and TI at 5e-3), step-wise I = {s['stepwise_steps']}"
        f" per timestep, T = {s['ddim_steps']} DDIM steps, guidance 7.5;"
        f" reference guidance t_s = {s['t_start']}, t_e = {s['t_end']}, J = {s['phi_steps']}."
        " Mean and 95% bootstrap interval over (subject, seed) cells"
        + (" (the reference rows: one cell per subject)." if any(r in rows for r in REFERENCE) else "."),
        *([f"The subject's {' and '.join(details)}: the share of a cell's images in which the toy detail"
           " classifier (the object cropped by the toy segmenter) reads it, in its colour."] if details else []),
        "",
        "## Table 1",
        "",
        *table(_with_reference(summary["table1"], rows, after="no-tuning")),
        f"| other subjects' photos (floor) | {cells(rows['other-subjects'])} |",
        "",
        "## Table 2",
        "",
        *table(_with_reference(summary["table2"], rows)),
        "",
    ]
    return "\n".join(lines)


def _with_reference(names: Sequence[str], rows: dict[str, Any], after: str | None = None) -> list[str]:
    """A table's rows with the reference rows that were measured, after ``after`` (else first)."""
    refs = [r for r in REFERENCE if r in rows]
    out = list(names)
    at = out.index(after) + 1 if after in out else 0
    return out[:at] + refs + out[at:]


def _plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a convenience; the tables carry the numbers
        return
    names = [n for n in _with_reference(ROWS, summary["rows"], after="no-tuning") if n in summary["rows"]]
    metrics = [m for m in (*METRICS, *DETAILS) if any(m in summary["rows"][n] for n in names)]
    rows_of = (len(metrics) + 2) // 3
    fig, grid = plt.subplots(rows_of, 3, figsize=(14, 4.2 * rows_of), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes, metrics, strict=False):
        ys, los, his, labels = [], [], [], []
        for n in names:
            e = summary["rows"][n].get(metric)
            if e:
                ys.append(e["mean"])
                los.append(e["mean"] - e["ci95"][0])
                his.append(e["ci95"][1] - e["mean"])
                labels.append(n)
        ax.errorbar(range(len(ys)), ys, yerr=[los, his], fmt="o", capsize=4)
        ax.set_xticks(range(len(ys)), labels, rotation=45, ha="right")
        ax.set_title(METRIC_NAMES.get(metric) or f"{DETAIL_NAMES[metric]} (share of images)")
        ax.grid(alpha=0.3)
    fig.suptitle("ToyWorld: each row's mean and 95% interval over (subject, seed) cells")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# -- the model check --------------------------------------------------------------------------


def run_check(out: str | Path, *, model: str | None = None, samples: int = 60, num_steps: int = 25,
              guidance: float = 7.5, device: str | None = None, reference_steps: int = 20,
              reference_seeds: Sequence[int] = (0, 1)) -> dict[str, Any]:
    """Prompt following, detail following and the reference rows of the ToyWorld model; writes ``check.json``
    and ``check.md``.

    ``device`` is where the diffusion model runs (default the CPU); the scorers stay on the CPU.
    The reference rows use the tables' protocol (the first 6 prompts, T = ``reference_steps``,
    guidance 7.5, one image per prompt and seed in ``reference_seeds``).
    """
    from hifi_backends.toy.perception import build_toy_detail, build_toy_segmenter, load_toyclip
    from hifi_backends.toy.quality import colour_following, detail_following, prompt_following, reference_rows

    out = Path(out)
    backend = load_backend("toy", model=model, **({"device": device} if device else {}))
    clip = load_toyclip(model)
    detail = build_toy_detail(model=model)
    began = time.time()
    report = prompt_following(backend, clip, samples=samples, num_steps=num_steps, guidance=guidance)
    colour = colour_following(backend, build_toy_segmenter(model=model), samples=samples, num_steps=num_steps,
                              guidance=guidance)
    details = detail_following(backend, detail, samples=samples, num_steps=num_steps, guidance=guidance)
    seconds = round(time.time() - began, 1)
    scorers = Scorers(load_embedder("toy-id", model=model), clip)
    reference = reference_rows(backend, scorers, seeds=reference_seeds, num_steps=reference_steps, detail=detail)
    result = {"prompt_following": report.as_dict(), "colour_following": colour.as_dict(),
              "detail_following": details.as_dict(), "seconds": seconds, "num_steps": num_steps,
              "reference_steps": reference_steps,
              "guidance": guidance, "reference": reference.as_dict(), "model": model or "bundled ToyWorld model"}
    write_json(out / "check.json", result)
    with atomic_path(out / "check.md") as tmp:
        tmp.write_text(check_markdown(result))
    return result


def _pct(entry: dict[str, Any]) -> str:
    return f"{entry['rate']:.0%} [{entry['ci95'][0]:.0%}, {entry['ci95'][1]:.0%}]"


def check_markdown(result: dict[str, Any]) -> str:
    """``check.md`` of a :func:`run_check` result."""
    from hifi_backends.toy.quality import REFERENCE_ROWS

    report, colour, details = result["prompt_following"], result["colour_following"], result["detail_following"]
    ref = result["reference"]
    samples, num_steps, guidance = report["samples"], result["num_steps"], result["guidance"]
    md = [
        "# ToyWorld model check",
        "",
        f"{samples} generations (T = {num_steps} DDIM steps, guidance {guidance:g}) for prompts \"a <class> <scene>\";"
        " ToyCLIP zero-shot picks the scene among all 10 (the prompt's class fixed) and the class among all 8"
        " (the prompt's scene fixed).",
        "",
        "| images | scene recovered | class recovered |",
        "| --- | ---: | ---: |",
        f"| generated by the ToyWorld model | {report['scene_accuracy']:.0%} | {report['class_accuracy']:.0%} |",
        f"| rendered (the classifier's own ceiling) | {report['renders_scene_accuracy']:.0%} |"
        f" {report['renders_class_accuracy']:.0%} |",
        f"| rendered, then through the VAE (the latent space's ceiling) | {report['vae_scene_accuracy']:.0%} |"
        f" {report['vae_class_accuracy']:.0%} |",
        "",
        f"Colour: {samples} more generations for \"a <colour> <class> <scene>\" (8 main colours); the colour shown is"
        " the palette colour nearest the median of the object's pixels (the toy segmenter's mask), no ToyCLIP.",
        "",
        "| images | colour recovered |",
        "| --- | ---: |",
        f"| generated by the ToyWorld model | {colour['colour_accuracy']:.0%} |",
        f"| rendered, plain (the measure's own ceiling) | {colour['renders_colour_accuracy']:.0%} |",
        "",
        f"Details: {details['samples']} more generations for full captions of random patterned, marked looks"
        " (\"a red mug with white stripes and a blue cross on the beach\"); the toy detail classifier (the object"
        " cropped by the toy segmenter's mask, a small CNN trained on crops of blurred renders, no ToyCLIP) reads"
        " the pattern, the mark and their colours. Following = the"
        " prompted pattern (mark) in its colour; the kind alone beside it. 95% Wilson intervals.",
        "",
        "| images | pattern | mark | pattern kind | mark kind |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, key in (("generated by the ToyWorld model", "generated"),
                       ("rendered (the judge's own ceiling)", "renders"),
                       ("rendered, then through the VAE (the latent space's ceiling)", "vae")):
        d = details[key]
        md.append(f"| {label} | {_pct(d['pattern'])} | {_pct(d['mark'])} | {_pct(d['pattern_kind'])} |"
                  f" {_pct(d['mark_kind'])} |")
    rows = ref["rows"]
    md += [
        "",
        f"Reference rows: what the model shows of each evaluation subject without the method. Each subject's 5"
        f" photos against: its own other photos, their VAE round trips (each against the other photos), untuned"
        f" generations told its exact description (\"a red mug with white stripes and a yellow diamond on the"
        f" beach\") or only its class word (\"a mug on the beach\"), and the other subjects' photos. Generations:"
        f" the first {len(ref['prompts'])} prompts, seeds {list(ref['seeds'])}, T = {result['reference_steps']},"
        " guidance 7.5. Mean and 95% bootstrap interval over the 10 subjects.",
        "",
        "| row | identity (DINO's role) | ToyCLIP-I | ToyCLIP-T |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label in REFERENCE_ROWS.items():
        r = rows[key]
        md.append(f"| {label} | {_fmt(r.get('dino'))} | {_fmt(r.get('clip_i'))} | {_fmt(r.get('clip_t'))} |")
    detail_ref = ref.get("detail", {})
    if detail_ref:
        md += [
            "",
            "Pattern and mark following of the subjects' own images (the detail classifier; mean over subjects, 95%"
            " bootstrap interval; hits of all images):",
            "",
            "| images | pattern | mark |",
            "| --- | ---: | ---: |",
        ]
        for key, label in (("photos", "the photos"), ("vae", "the photos' VAE round trips"),
                           ("exact", "untuned, told the exact description")):
            if key in detail_ref:
                d = detail_ref[key]
                md.append(f"| {label} | {_fmt(d['pattern'])} ({d['pattern']['hits']}/{d['pattern']['n']}) |"
                          f" {_fmt(d['mark'])} ({d['mark']['hits']}/{d['mark']['n']}) |")
    names = list(rows["real"]["dino"]["per_subject"])
    md += ["", "Per subject (identity):", "",
           "| subject | real | VAE round trip | exact description | class word | pattern (exact) | mark (exact) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in names:
        cells = [f"{rows[k]['dino']['per_subject'][n]:.3f}" for k in ("real", "vae", "exact", "class")]
        if "exact" in detail_ref:
            cells += [f"{detail_ref['exact'][m]['per_subject'][n]:.0%}" for m in ("pattern", "mark")]
        else:
            cells += ["n/a", "n/a"]
        md.append(f"| {n} | " + " | ".join(cells) + " |")
    md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.toyworld", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="prompt and detail following and the reference rows of the ToyWorld model")
    c.add_argument("--out", default="benchmarks/results/toyworld-model")
    c.add_argument("--model", default=None, help="a ToyWorld folder (default: the bundled one)")
    c.add_argument("--samples", type=int, default=60)
    c.add_argument("--ddim-steps", type=int, default=25)
    c.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance scale of the prompt-following and colour generations"
                        " (the reference rows keep 7.5)")
    c.add_argument("--device", default=None, help="where the diffusion model runs (default: cpu)")
    t = sub.add_parser("tables", help="Table 1 and Table 2 on ToyWorld")
    t.add_argument("--out", default="benchmarks/results/toyworld-tables")
    t.add_argument("--model", default=None, help="model folder (default: the bundled ToyWorld model)")
    t.add_argument("--backend", default="toy", help="denoiser backend (e.g. sd14-fp16 with --model for SD 1.4)")
    t.add_argument("--dataset", default=None, help="a DreamBooth-layout folder (default: the ToyWorld subjects)")
    t.add_argument("--masks", default=None, help="with --dataset: none, auto (Grounded SAM) or a folder")
    t.add_argument("--device", default=None)
    t.add_argument("--work", default=None, help="runs, images and scores (default OUT/work; resumable, shareable)")
    t.add_argument("--paper", action="store_true",
                   help="the paper's protocol: every subject and prompt, 4 images, each method's own steps, T=50")
    t.add_argument("--subjects", default=None,
                   help="comma-separated (default: every ToyWorld subject, or every subject of --dataset)")
    t.add_argument("--rows", default=",".join(ROWS))
    for flag, kind in (("--prompts", int), ("--images-per-prompt", int), ("--steps", int),
                       ("--dreambooth-lr", float), ("--stepwise-steps", int), ("--ddim-steps", int),
                       ("--t-start", int), ("--t-end", int), ("--phi-steps", int)):
        t.add_argument(flag, type=kind, default=None, help="(default: the scaled-down ToyWorld protocol)")
    t.add_argument("--seeds", default=None, help="comma-separated tuning seeds (default 0,1; 0 with --paper)")
    t.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.command == "check":
        try:
            result = run_check(args.out, model=args.model, samples=args.samples, num_steps=args.ddim_steps,
                               guidance=args.guidance, device=args.device)
        except HifiError as err:
            print(f"toyworld: error: {err}", file=sys.stderr)
            return 2
        print((Path(args.out) / "check.md").read_text())
        del result
        return 0
    base = PAPER if args.paper else TableSettings()
    if args.dataset is None and args.paper:
        base = attrs.evolve(base, subjects=tuple(SUBJECTS))
    changes: dict[str, Any] = {
        name: getattr(args, name) for name in ("prompts", "images_per_prompt", "steps", "dreambooth_lr",
                                               "stepwise_steps", "ddim_steps", "t_start", "t_end", "phi_steps")
        if getattr(args, name) is not None
    }
    if args.subjects:
        changes["subjects"] = tuple(args.subjects.split(","))
    elif args.dataset is not None:
        changes["subjects"] = ()  # every subject of the dataset
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    settings = attrs.evolve(base, **changes)
    bad_rows = [r for r in args.rows.split(",") if r not in ROWS]
    unknown = [s for s in settings.subjects if s not in SUBJECTS] if args.dataset is None else []
    if unknown or bad_rows:
        p.error(f"unknown subjects {unknown} or rows {bad_rows}")
    try:
        summary = run_tables(args.out, settings, model=args.model, rows=args.rows.split(","),
                             progress=not args.quiet, dataset=args.dataset, backend=args.backend, masks=args.masks,
                             device=args.device, work=args.work)
    except HifiError as err:
        print(f"toyworld: error: {err}", file=sys.stderr)
        return 2
    print(tables_markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
