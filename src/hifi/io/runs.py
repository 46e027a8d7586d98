"""The run folder: what ``hifi tune`` writes and every later command reads.

Layout (all files written atomically)::

    RUN_DIR/
      run.json                     metadata and the resolved config (see RunMeta)
      subject.safetensors          c_s as "c_s" [n, D]; each c_s^t as "c_s_t{t:04d}" (a flow's t: its float);
                                   the classic-TI vector as "token_vector"; string metadata
                                   (backend, model id, mode, class, caption, tokens ...)
      learned_embeds.safetensors   classic-ti only: {"<hifi-subject>": [D_in]}, the file
                                   diffusers' ``load_textual_inversion`` reads; on SDXL
                                   {"clip_l": [1, 768], "clip_g": [1, 1280]}, one vector per
                                   text encoder, the layout SDXL embedding loaders read
      denoiser.safetensors         dreambooth only: the fine-tuned UNet state dict
      pytorch_lora_weights.safetensors
                                   dreambooth with --lora-rank, instead: the UNet's LoRA adapters
                                   in the layout diffusers' ``load_lora_weights`` reads
                                   (``unet.<module>.lora.down.weight`` / ``.lora.up.weight``)
      masks/NAME.png               the masks the run was tuned with, by source file name
      sources/NAME.png             the source photos as tuned (square, backend resolution)
      losses.jsonl                 one JSON object per optimisation step
      samples/seedS.png, grid.png  plain generations of the tuned subject (``--samples``)
      checkpoint/                  resumable state while a tune is in progress

A run written by one backend refuses to load into an incompatible one (text width, text
length, or noise schedule differ).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from hifi import __version__
from hifi.algorithms.subject import PLACEHOLDER, Mode, Subject
from hifi.errors import HifiError
from hifi.io.images import atomic_path, write_json
from hifi.kernels.ddim import timestep_from_text, timestep_text
from hifi.protocols.denoiser import DenoiserBackend, LoraBackend, lora_backend

__all__ = [
    "CHECKPOINT_DIR",
    "DENOISER_FILE",
    "LORA_FILE",
    "LOSSES_FILE",
    "MASKS_DIR",
    "RUN_FILE",
    "SAMPLES_DIR",
    "SDXL_EMBEDDING_KEYS",
    "SOURCES_DIR",
    "SUBJECT_FILE",
    "TI_FILE",
    "FolderCheckpointer",
    "Run",
    "RunMeta",
    "apply_run",
    "embedding_tensors",
    "check_compatible",
    "load_run",
    "load_tensors",
    "save_run",
    "save_tensors",
    "write_jsonl",
]

# The run folder's names (the layout above); every reader and writer of a run uses these.
RUN_FILE = "run.json"
SUBJECT_FILE = "subject.safetensors"
TI_FILE = "learned_embeds.safetensors"
DENOISER_FILE = "denoiser.safetensors"
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")
"""The keys of an SDXL embedding file, one per text encoder (AUTOMATIC1111's, ComfyUI's and kohya's SDXL layout)."""
LORA_FILE = "pytorch_lora_weights.safetensors"
"""The name ``StableDiffusionPipeline.save_lora_weights`` writes and ``load_lora_weights(folder)`` looks for."""
MASKS_DIR = "masks"
SOURCES_DIR = "sources"
LOSSES_FILE = "losses.jsonl"
SAMPLES_DIR = "samples"
CHECKPOINT_DIR = "checkpoint"


@attrs.frozen
class RunMeta:
    """What a run records about how it was made."""

    backend: str
    model_id: str
    mode: Mode
    class_name: str
    caption: str
    num_tokens: int
    text_width: int
    max_length: int
    schedule: dict[str, Any]
    num_steps: int
    sources: tuple[str, ...]
    masks: str
    """``"none"`` (all-ones), ``"folder"`` or ``"auto"``."""
    config: dict[str, Any] = attrs.field(factory=dict)
    peak_memory: dict[str, Any] = attrs.field(factory=dict)
    """How much memory the tune took (:func:`hifi.execution.memory.peak_memory`); empty in older runs."""
    lora_rank: int | None = None
    """A LoRA DreamBooth run: the adapters' rank (None: no LoRA)."""
    lora_file: str | None = None
    """A LoRA DreamBooth run: the adapters' file in the run folder (:data:`LORA_FILE`); set by :func:`save_run`."""
    token_widths: tuple[int, ...] | None = None
    """A classic-TI run: the token vector's parts, one per text encoder (SDXL: 768 and 1280); None: one part."""
    version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunMeta:
        fields = {f.name for f in attrs.fields(cls)}
        known = {k: v for k, v in data.items() if k in fields}
        known["sources"] = tuple(known.get("sources", ()))
        if known.get("token_widths") is not None:
            known["token_widths"] = tuple(known["token_widths"])
        return cls(**known)


@attrs.frozen(eq=False)
class Run:
    """A loaded run: its metadata, its subject, and where its files are."""

    path: Path
    meta: RunMeta
    subject: Subject

    @property
    def denoiser_file(self) -> Path | None:
        p = self.path / DENOISER_FILE
        return p if p.exists() else None

    def source_images(self) -> list[Path]:
        return sorted((self.path / SOURCES_DIR).glob("*.png"))

    def mask_images(self) -> list[Path]:
        return sorted((self.path / MASKS_DIR).glob("*.png"))


def save_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """safetensors, written atomically; tensors are made contiguous CPU copies."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=dict(metadata or {}))


def load_tensors(path: Path) -> dict[str, Tensor]:
    """Load a safetensors file with a clear error when it is missing or damaged."""
    if not path.exists():
        raise HifiError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise HifiError(f"{path} is not a readable safetensors file ({err})") from err


def embedding_tensors(vector: Tensor, widths: Sequence[int] | None) -> dict[str, Tensor]:
    """A classic-TI vector as an embedding file holds it: ``{PLACEHOLDER: [D]}`` for one text encoder, and
    ``{"clip_l": [1, w_1], "clip_g": [1, w_2]}`` for SDXL's two (``widths``: the parts, in order)."""
    if widths is None or len(widths) == 1:
        return {PLACEHOLDER: vector}
    if len(widths) != len(SDXL_EMBEDDING_KEYS) or sum(widths) != vector.shape[-1]:
        raise HifiError(f"a token vector of width {vector.shape[-1]} does not split into parts {tuple(widths)}")
    parts = vector.split(list(widths))
    return {key: part[None] for key, part in zip(SDXL_EMBEDDING_KEYS, parts, strict=True)}


def save_run(
    run_dir: Path,
    subject: Subject,
    meta: RunMeta,
    *,
    denoiser_state: Mapping[str, Tensor] | None = None,
    lora_state: Mapping[str, Tensor] | None = None,
) -> None:
    """Write the subject files and run.json (run.json last: its presence marks a finished run).

    ``denoiser_state``: a DreamBooth run's UNet weights; ``lora_state``: a LoRA DreamBooth run's
    adapters (:meth:`hifi.protocols.denoiser.LoraBackend.lora_state`), which ``meta`` then names.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    if subject.c_s is not None:
        tensors["c_s"] = subject.c_s
    for t, v in subject.stepwise.items():
        tensors[f"c_s_t{timestep_text(t)}"] = v
    if subject.token_vector is not None:
        tensors["token_vector"] = subject.token_vector
        save_tensors(run_dir / TI_FILE, embedding_tensors(subject.token_vector, meta.token_widths))
    if not tensors:
        tensors["empty"] = torch.zeros(0)  # dreambooth: the subject is in the denoiser's weights or LoRA
    string_meta = {
        "backend": meta.backend, "model_id": meta.model_id, "mode": meta.mode,
        "class_name": meta.class_name, "caption": meta.caption, "num_tokens": str(meta.num_tokens),
        "text_width": str(meta.text_width), "num_steps": str(meta.num_steps),
        "schedule": json.dumps(meta.schedule, sort_keys=True), "masks": meta.masks,
        "library": f"hifi {meta.version}",
    }
    save_tensors(run_dir / SUBJECT_FILE, tensors, string_meta)
    if denoiser_state is not None:
        save_tensors(run_dir / DENOISER_FILE, denoiser_state, {"format": "diffusers UNet2DConditionModel state dict"})
    if lora_state is not None:
        save_tensors(run_dir / LORA_FILE, lora_state, {"format": "pt"})  # the metadata save_lora_weights writes
        meta = attrs.evolve(meta, lora_file=LORA_FILE)
    write_json(run_dir / RUN_FILE, meta.to_json())


def load_run(run_dir: str | Path) -> Run:
    """Read a finished run folder."""
    path = Path(run_dir)
    meta_file = path / RUN_FILE
    if not meta_file.exists():
        hint = " (a tune in progress? rerun it with --resume)" if (path / CHECKPOINT_DIR).exists() else ""
        raise HifiError(f"{path} is not a finished hifi run: {RUN_FILE} is missing{hint}")
    try:
        meta = RunMeta.from_json(json.loads(meta_file.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise HifiError(f"{meta_file} is damaged ({err})") from err
    tensors = load_tensors(path / SUBJECT_FILE)
    stepwise = {timestep_from_text(k[len("c_s_t"):]): v for k, v in tensors.items() if k.startswith("c_s_t")}
    subject = Subject(
        class_name=meta.class_name, mode=meta.mode, c_s=tensors.get("c_s"),
        stepwise=dict(sorted(stepwise.items(), reverse=True)), token_vector=tensors.get("token_vector"),
    )
    return Run(path=path, meta=meta, subject=subject)


def check_compatible(meta: RunMeta, backend: DenoiserBackend) -> None:
    """Refuse, with a clear message, a run made for a model of another shape or schedule."""
    problems: list[str] = []
    if meta.text_width != backend.text_width:
        problems.append(f"text width {meta.text_width} vs {backend.text_width}")
    if meta.max_length != backend.max_length:
        problems.append(f"text length {meta.max_length} vs {backend.max_length}")
    ours = backend.schedule.to_config()
    for key in ("num_train_timesteps", "prediction_type", "alphas_cumprod_sum"):
        if meta.schedule.get(key) != ours.get(key):
            problems.append(f"scheduler {key} {meta.schedule.get(key)} vs {ours.get(key)}")
    if problems:
        raise HifiError(
            f"this run was tuned on backend {meta.backend!r} ({meta.model_id}) and does not fit"
            f" backend {backend.name!r} ({backend.model_id}): " + "; ".join(problems)
        )


def apply_run(run: Run, backend: DenoiserBackend) -> Subject:
    """Check compatibility, load DreamBooth weights or LoRA if any, and return the subject on the backend's device.

    A LoRA of an earlier run comes off the backend first: one run's adapters at a time.
    """
    check_compatible(run.meta, backend)
    if run.meta.lora_file is not None:
        lora_backend(backend).load_lora_state(load_tensors(run.path / run.meta.lora_file))
        return run.subject.to(backend.device)
    if isinstance(backend, LoraBackend):
        backend.remove_lora()
    if run.meta.mode == "dreambooth":
        if run.denoiser_file is None:
            raise HifiError(f"{run.path} is a dreambooth run without {DENOISER_FILE}")
        backend.load_denoiser_state(load_tensors(run.denoiser_file))
    return run.subject.to(backend.device)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write JSON lines atomically (the whole file: a log rewritten at each checkpoint)."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(dict(r), sort_keys=True) + "\n" for r in rows))


def _flatten(value: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    """Nested state -> JSON, with tensors moved to ``tensors`` under path-like keys."""
    if isinstance(value, Tensor):
        tensors[prefix] = value
        return {"__tensor__": prefix}
    if isinstance(value, Mapping):
        return {"__items__": [[k, _flatten(v, tensors, f"{prefix}/{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(value)]
    return value


def _unflatten(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__items__" in value:
        return {k: _unflatten(v, tensors) for k, v in value["__items__"]}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


class FolderCheckpointer:
    """Resumable tune state in ``RUN_DIR/checkpoint/``: tensors in safetensors, the rest in JSON.

    Each save writes a new ``state-N.safetensors``, then ``state.json`` naming it (atomic
    replace), then removes the older tensors file; so a crash at any point leaves the
    previous complete checkpoint readable. Dictionary keys keep their types (Adam's state
    is keyed by integers).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.index = folder / "state.json"

    def load(self) -> dict[str, Any] | None:
        if not self.index.exists():
            return None
        try:
            index = json.loads(self.index.read_text())
        except json.JSONDecodeError as err:
            raise HifiError(f"{self.index} is damaged ({err}); delete the checkpoint folder to start over") from err
        tensors = load_tensors(self.folder / index["tensors"])
        state: dict[str, Any] = _unflatten(index["state"], tensors)
        return state

    def save(self, state: Mapping[str, Any]) -> None:
        tensors: dict[str, Tensor] = {}
        tree = _flatten(dict(state), tensors, "s")
        counter = 0
        if self.index.exists():
            counter = int(json.loads(self.index.read_text()).get("counter", 0)) + 1
        name = f"state-{counter}.safetensors"
        save_tensors(self.folder / name, tensors or {"empty": torch.zeros(0)})
        write_json(self.index, {"tensors": name, "counter": counter, "state": tree})
        for old in self.folder.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink()

    def clear(self) -> None:
        """Remove the checkpoint (after the run's final files are written)."""
        for f in list(self.folder.glob("state-*.safetensors")) + [self.index]:
            if f.exists():
                f.unlink()
        if self.folder.exists() and not any(self.folder.iterdir()):
            self.folder.rmdir()
