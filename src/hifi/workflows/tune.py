"""File-level tuning: a folder of photos in, a run folder out.

Joins the I/O edge (:mod:`hifi.io`) to :func:`hifi.algorithms.tune.tune`; the command line
is a thin layer over it, and an embedding product can call it directly. It never prints:
warnings come back in the result, progress goes to an optional tqdm bar.
"""

from __future__ import annotations

from pathlib import Path

import attrs
from tqdm.auto import tqdm

from hifi.algorithms.generate import generate
from hifi.algorithms.tune import TuneConfig, caption_for, tune
from hifi.errors import HifiError
from hifi.execution.edge import execution_for
from hifi.execution.memory import peak_memory, reset_peak_memory
from hifi.io.images import check_writable, make_grid, save_image, tensor_to_image
from hifi.io.runs import (
    CHECKPOINT_DIR,
    LOSSES_FILE,
    MASKS_DIR,
    RUN_FILE,
    SAMPLES_DIR,
    SOURCES_DIR,
    FolderCheckpointer,
    RunMeta,
    save_run,
    write_jsonl,
)
from hifi.protocols.denoiser import DenoiserBackend, textual_inversion
from hifi.workflows.photos import load_subject_photos

__all__ = ["TuneOutcome", "tune_to_run"]


@attrs.frozen
class TuneOutcome:
    run_dir: Path
    warnings: tuple[str, ...]
    final_loss: float | None


def tune_to_run(
    backend: DenoiserBackend,
    subject_dir: str | Path,
    class_name: str,
    out: str | Path,
    *,
    config: TuneConfig | None = None,
    masks: str | Path | None = None,
    resume: bool = False,
    samples: int = 2,
    progress: bool = False,
    accel: str = "eager",
) -> TuneOutcome:
    """Tune on a folder of photos and write a run folder (see :mod:`hifi.io.runs`).

    With ``resume`` an interrupted tune in ``out`` continues from its last checkpoint
    (the result equals an uninterrupted run's on the CPU); without it, a folder that
    already holds a run or a checkpoint is refused. ``accel`` is the execution mode of the
    c_s steps (:func:`hifi.execution.edge.execution_for`); it changes speed, not results
    beyond rounding, and a run may resume under another mode.
    """
    config = config or TuneConfig()
    run_dir = Path(out)
    if not class_name.strip():
        raise HifiError("--class-name must not be empty")
    execution = execution_for(backend, accel)  # before anything is written
    checkpointer = FolderCheckpointer(run_dir / CHECKPOINT_DIR)
    if not resume and ((run_dir / RUN_FILE).exists() or checkpointer.index.exists()):
        raise HifiError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    if resume and (run_dir / RUN_FILE).exists() and not checkpointer.index.exists():
        raise HifiError(f"{run_dir} holds a finished run: nothing to resume")
    check_writable(run_dir)  # creates nothing: a failure below leaves no folder behind
    photos = load_subject_photos(subject_dir, backend.resolution, masks, class_name=class_name)
    total = config.total_steps + (config.stepwise_steps * config.num_steps if config.mode == "hifi" else 0)
    bar = tqdm(total=total, desc=f"tune {config.mode}", disable=not progress, unit="step", dynamic_ncols=True)

    def on_step(stage: str, step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(stage=stage, loss=f"{loss:.4f}")

    resumed_state = checkpointer.load() if resume else None
    if resumed_state is not None:
        bar.update(len(resumed_state.get("losses", [])))
    reset_peak_memory(backend.device)
    try:
        result = tune(
            backend, photos.images, class_name,
            masks=photos.masks if config.use_mask else None, config=config,
            checkpointer=checkpointer, on_step=on_step, model=execution.model(backend.denoise),
            optimiser=execution.runner,
        )
    finally:
        bar.close()
    for folder, tensors, names in ((SOURCES_DIR, photos.images, photos.names), (MASKS_DIR, photos.masks, photos.names)):
        for name, t in zip(names, tensors, strict=True):
            save_image(tensor_to_image(t), run_dir / folder / f"{name}.png")
    meta = RunMeta(
        backend=backend.name, model_id=backend.model_id, mode=config.mode, class_name=class_name,
        caption=result.caption, num_tokens=result.subject.num_tokens, text_width=backend.text_width,
        max_length=backend.max_length, schedule=backend.schedule.to_config(), num_steps=config.num_steps,
        sources=photos.names, masks=photos.mask_source if config.use_mask else "none", config=config.resolved(),
        peak_memory=peak_memory(backend.device), lora_rank=config.lora_rank,
        token_widths=textual_inversion(backend).input_widths if config.mode == "classic-ti" else None,
    )
    write_jsonl(run_dir / LOSSES_FILE, result.losses)
    if samples > 0:
        gen = generate(backend, result.subject, caption_for("hifi", class_name), list(range(samples)),
                       num_steps=config.num_steps)
        images = [tensor_to_image(x) for x in gen.images]
        for seed, im in zip(gen.seeds, images, strict=True):
            save_image(im, run_dir / SAMPLES_DIR / f"seed{seed}.png")
        save_image(make_grid(images, cols=len(images)), run_dir / SAMPLES_DIR / "grid.png")
    save_run(run_dir, result.subject, meta, denoiser_state=result.denoiser_state, lora_state=result.lora_state)
    checkpointer.clear()
    final = result.losses[-1]["loss"] if result.losses else None
    return TuneOutcome(run_dir=run_dir, warnings=photos.warnings, final_loss=final)
