"""ToyWorld measurements: the model check (issue: ToyWorld) and the paper's tables (Table 1 / Table 2).

    python -m benchmarks.toyworld check  --out benchmarks/results/toyworld-model
    python -m benchmarks.toyworld tables --out benchmarks/results/toyworld-tables

``check``: does the bundled model follow prompts (ToyCLIP zero-shot scene and class of
generated images, beside the same classifier on renders), and do the metrics separate
(real vs real, other subjects' photos, generations without the subject)?

``tables``: every row of Table 1 and Table 2 through ``hifi eval``'s library API on the
ToyWorld subjects, with the world's identity metric (DINO's role), ToyCLIP-I and ToyCLIP-T,
mean and 95% bootstrap interval over (subject, seed) cells; a plot; and each row's grid
for two subjects. Step counts are scaled down for this world and equal across rows.
Both are resumable (the evaluation's files are reused) and write atomically.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from hifi.algorithms.reference import ReferenceSettings
from hifi.evaluation import METHODS, EvalSettings, Scorers, evaluate, load_dreambooth
from hifi.io import atomic_path, image_to_tensor, list_images, load_image, write_json
from hifi.perception_registry import load_embedder
from hifi.registry import load_backend
from hifi.toyworld.subjects import SUBJECTS, export_dataset

TABLE1 = ("real", "no-tuning", "ti", "hifi", "dreambooth", "dreambooth-ref")
TABLE2 = ("ti", "ti-mask", "hifi-reg", "hifi-stepwise", "hifi", "dreambooth", "dreambooth-ref")
ROWS = tuple(dict.fromkeys(TABLE1 + TABLE2))
METRICS = ("dino", "clip_i", "clip_t")
METRIC_NAMES = {"dino": "identity (DINO's role)", "clip_i": "ToyCLIP-I", "clip_t": "ToyCLIP-T"}


@attrs.frozen
class TableSettings:
    """The scaled-down protocol, equal for every row."""

    subjects: tuple[str, ...] = tuple(list(SUBJECTS)[:8])
    prompts: int = 10
    images_per_prompt: int = 2
    seeds: tuple[int, ...] = (0,)
    steps: int = 250  # c_s / TI token / DreamBooth steps
    dreambooth_lr: float = 5e-5  # SD's 5e-6 barely moves a from-scratch 4M UNet in 250 steps
    stepwise_steps: int = 3  # I of Algorithm 1, per timestep
    ddim_steps: int = 20
    t_start: int = 16
    t_end: int = 4
    phi_steps: int = 3


def _interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    rng = random.Random(seed)
    vals = list(values)
    means = sorted(statistics.fmean(rng.choices(vals, k=len(vals))) for _ in range(resamples))
    return statistics.fmean(vals), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def _cells(rows: Sequence[dict[str, Any]], metric: str) -> list[float]:
    """One value per (subject, seed) cell: the mean over that cell's prompts and images."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.get(metric) in ("", None):
            continue
        groups.setdefault((r["subject"], str(r.get("eval_seed", ""))), []).append(float(r[metric]))
    return [statistics.fmean(v) for v in groups.values()]


def _read_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_tables(out: str | Path, settings: TableSettings = TableSettings(), *, model: str | None = None,
               rows: Sequence[str] = ROWS, progress: bool = False) -> dict[str, Any]:
    """Evaluate every row on the ToyWorld subjects; write tables, plot and grids to ``out``."""
    out = Path(out)
    work = out / "work"
    dataset_dir, masks_dir = export_dataset(work / "data", list(settings.subjects))
    dataset = load_dreambooth(dataset_dir)
    scorers = Scorers(load_embedder("toy-id", model=model), load_embedder("toyclip", model=model))
    reference = ReferenceSettings(num_steps=settings.ddim_steps, t_start=settings.t_start, t_end=settings.t_end,
                                  phi_steps=settings.phi_steps)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for row in rows:
        collected: list[dict[str, Any]] = []
        began = time.time()
        for seed in settings.seeds:
            eval_settings = EvalSettings(
                method=row, subjects=settings.subjects, prompts=settings.prompts,
                images_per_prompt=settings.images_per_prompt, steps=settings.steps,
                stepwise_steps=settings.stepwise_steps, num_steps=settings.ddim_steps, seed=seed,
                masks=str(masks_dir), reference=reference,
                learning_rates=(("dreambooth", settings.dreambooth_lr),),
            )
            folder = work / f"seed{seed}"
            evaluate(dataset, lambda: load_backend("toy", model=model), scorers, folder, eval_settings,
                     progress=progress)
            collected += [{**r, "eval_seed": seed} for r in _read_rows(folder / row / "scores.csv")]
        timings[row] = round(time.time() - began, 1)
        results[row] = {}
        for metric in METRICS:
            cells = _cells(collected, metric)
            if cells:
                mean, lo, hi = _interval(cells)
                results[row][metric] = {"mean": mean, "ci95": [lo, hi], "cells": len(cells)}
    results["other-subjects"] = _other_subjects(dataset_dir, settings.subjects, scorers)
    summary = {
        "settings": attrs.asdict(settings),
        "model": model or "bundled ToyWorld model",
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
                shutil.copyfile(grid, out / "grids" / f"{subject}.{row}.png")
    return summary


def _other_subjects(dataset_dir: Path, subjects: Sequence[str], scorers: Scorers) -> dict[str, Any]:
    """Each subject's photos against every *other* subject's photos: the floor of the identity metrics."""
    feats = {}
    for s in subjects:
        images = torch.stack([image_to_tensor(load_image(f), 64) for f in list_images(dataset_dir / s)])
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
            mean, lo, hi = _interval(cells)
            out[metric] = {"mean": mean, "ci95": [lo, hi], "cells": len(cells)}
    return out


def _fmt(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    return f"{entry['mean']:.3f} [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"


def tables_markdown(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    rows = summary["rows"]
    head = ["| row | " + " | ".join(METRIC_NAMES[m] for m in METRICS) + " |", "| --- | ---: | ---: | ---: |"]

    def table(names: Sequence[str]) -> list[str]:
        lines = list(head)
        for name in names:
            label = METHODS[name].description if name in METHODS else name
            lines.append(f"| {label} (`{name}`) | " + " | ".join(_fmt(rows.get(name, {}).get(m)) for m in METRICS)
                         + " |")
        return lines

    lines = [
        "# The paper's tables, measured on ToyWorld",
        "",
        f"{len(s['subjects'])} subjects ({', '.join(s['subjects'])}), first {s['prompts']} of the 25 prompts,"
        f" {s['images_per_prompt']} images per prompt, seeds {list(s['seeds'])}. Every row: {s['steps']} tuning"
        f" steps (DreamBooth at lr {s['dreambooth_lr']:g}; c_s and TI at 5e-3), step-wise I = {s['stepwise_steps']}"
        f" per timestep, T = {s['ddim_steps']} DDIM steps, guidance 7.5;"
        f" reference guidance t_s = {s['t_start']}, t_e = {s['t_end']}, J = {s['phi_steps']}."
        " Mean and 95% bootstrap interval over (subject, seed) cells.",
        "",
        "## Table 1",
        "",
        *table(summary["table1"]),
        f"| other subjects' photos (floor) | {_fmt(rows['other-subjects'].get('dino'))} |"
        f" {_fmt(rows['other-subjects'].get('clip_i'))} | n/a |",
        "",
        "## Table 2",
        "",
        *table(summary["table2"]),
        "",
    ]
    return "\n".join(lines)


def _plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a convenience; the tables carry the numbers
        return
    names = [n for n in ROWS if n in summary["rows"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, metric in zip(axes, METRICS, strict=True):
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
        ax.set_title(METRIC_NAMES[metric])
        ax.grid(alpha=0.3)
    fig.suptitle("ToyWorld: each row's mean and 95% interval over (subject, seed) cells")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# -- the model check --------------------------------------------------------------------------


def run_check(out: str | Path, *, model: str | None = None, samples: int = 60, num_steps: int = 25) -> dict[str, Any]:
    """Prompt following and metric separation of the ToyWorld model; writes ``check.json`` and ``check.md``."""
    from hifi_backends.toy.perception import load_toyclip
    from hifi_backends.toy.quality import prompt_following

    out = Path(out)
    backend = load_backend("toy", model=model)
    clip = load_toyclip(model)
    began = time.time()
    report = prompt_following(backend, clip, samples=samples, num_steps=num_steps)
    seconds = round(time.time() - began, 1)
    result = {"prompt_following": report.as_dict(), "seconds": seconds, "num_steps": num_steps,
              "model": model or "bundled ToyWorld model"}
    write_json(out / "check.json", result)
    md = [
        "# ToyWorld model check",
        "",
        f"{samples} generations (T = {num_steps} DDIM steps, guidance 7.5) for prompts \"a <class> <scene>\";"
        " ToyCLIP zero-shot picks the scene among all 10 (the prompt's class fixed) and the class among all 8"
        " (the prompt's scene fixed).",
        "",
        "| images | scene recovered | class recovered |",
        "| --- | ---: | ---: |",
        f"| generated by the ToyWorld model | {report.scene_accuracy:.0%} | {report.class_accuracy:.0%} |",
        f"| rendered (the classifier's own ceiling) | {report.renders_scene_accuracy:.0%} |"
        f" {report.renders_class_accuracy:.0%} |",
        "",
    ]
    with atomic_path(out / "check.md") as tmp:
        tmp.write_text("\n".join(md))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.toyworld", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="prompt following of the ToyWorld model")
    c.add_argument("--out", default="benchmarks/results/toyworld-model")
    c.add_argument("--model", default=None, help="a ToyWorld folder (default: the bundled one)")
    c.add_argument("--samples", type=int, default=60)
    c.add_argument("--ddim-steps", type=int, default=25)
    t = sub.add_parser("tables", help="Table 1 and Table 2 on ToyWorld")
    t.add_argument("--out", default="benchmarks/results/toyworld-tables")
    t.add_argument("--model", default=None, help="a ToyWorld folder (default: the bundled one)")
    defaults = TableSettings()
    t.add_argument("--subjects", default=",".join(defaults.subjects))
    t.add_argument("--rows", default=",".join(ROWS))
    t.add_argument("--prompts", type=int, default=defaults.prompts)
    t.add_argument("--images-per-prompt", type=int, default=defaults.images_per_prompt)
    t.add_argument("--seeds", default=",".join(map(str, defaults.seeds)))
    t.add_argument("--steps", type=int, default=defaults.steps)
    t.add_argument("--dreambooth-lr", type=float, default=defaults.dreambooth_lr)
    t.add_argument("--stepwise-steps", type=int, default=defaults.stepwise_steps)
    t.add_argument("--ddim-steps", type=int, default=defaults.ddim_steps)
    t.add_argument("--t-start", type=int, default=defaults.t_start)
    t.add_argument("--t-end", type=int, default=defaults.t_end)
    t.add_argument("--phi-steps", type=int, default=defaults.phi_steps)
    t.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.command == "check":
        result = run_check(args.out, model=args.model, samples=args.samples, num_steps=args.ddim_steps)
        print((Path(args.out) / "check.md").read_text())
        del result
        return 0
    unknown = [s for s in args.subjects.split(",") if s not in SUBJECTS]
    bad_rows = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown or bad_rows:
        p.error(f"unknown subjects {unknown} or rows {bad_rows}")
    settings = TableSettings(
        subjects=tuple(args.subjects.split(",")), prompts=args.prompts, images_per_prompt=args.images_per_prompt,
        seeds=tuple(int(s) for s in args.seeds.split(",")), steps=args.steps,
        dreambooth_lr=args.dreambooth_lr, stepwise_steps=args.stepwise_steps,
        ddim_steps=args.ddim_steps, t_start=args.t_start, t_end=args.t_end, phi_steps=args.phi_steps,
    )
    summary = run_tables(args.out, settings, model=args.model, rows=args.rows.split(","), progress=not args.quiet)
    print(tables_markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
