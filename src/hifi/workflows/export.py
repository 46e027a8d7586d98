"""Export a run in the layout another tool reads: ``hifi export RUN --format FORMAT --out PATH``.

``--out`` is a folder for ``diffusers`` (diffusers' own file names go in it) and one
``NAME.safetensors`` file for ``a1111``, ``comfyui`` and ``kohya``: those tools name an
embedding by its file, so ``NAME`` is the trigger word. What each (kind of run, format)
writes, one entry each of :data:`EXPORTS` (the kind is the run's mode, and
``dreambooth-lora`` for a DreamBooth run whose subject is in LoRA adapters):

classic-ti, diffusers
    ``OUT/learned_embeds.safetensors``: ``{"<hifi-subject>": float32 [D]}``, one key (the
    token) and its input-embedding vector, the file diffusers'
    ``StableDiffusionPipeline.load_textual_inversion(OUT)`` reads (a one-key state dict is
    its "diffusers" layout).
classic-ti, a1111 / comfyui / kohya
    ``NAME.safetensors``: ``{"emb_params": float32 [n_vectors, D]}`` (n_vectors = 1), the
    embedding layout kohya's sd-scripts write (``train_textual_inversion.py``'s
    ``save_weights``; its ``load_weights`` and ``gen_img_diffusers.py
    --textual_inversion_embeddings`` read ``emb_params``, the token being the file's stem).
    AUTOMATIC1111 reads the same file from ``embeddings/`` (``textual_inversion.py``: a
    safetensors file whose one key holds an ``[n, D]`` tensor, named by its file; prompts
    say ``NAME``), and so does ComfyUI from ``models/embeddings/`` (``sd1_clip.load_embed``
    takes ``string_to_param``, else its model's key, else the file's first tensor;
    prompts say ``embedding:NAME``). diffusers' ``load_textual_inversion(FILE, token=NAME)``
    reads it too (one key: the vector).
classic-ti on SDXL, every format
    ``{"clip_l": float32 [1, 768], "clip_g": float32 [1, 1280]}`` (the run's own
    ``learned_embeds.safetensors``): one vector per text encoder, the SDXL embedding layout
    that AUTOMATIC1111 and ComfyUI read from their embeddings folders and kohya's
    ``sdxl_train_textual_inversion.py`` writes; diffusers reads it with one
    ``load_textual_inversion`` per text encoder
    (:func:`hifi.io.diffusers_compat.load_sdxl_embedding`).
dreambooth, diffusers
    ``OUT/unet/config.json`` and ``OUT/unet/diffusion_pytorch_model.safetensors``: the
    fine-tuned UNet as ``UNet2DConditionModel.save_pretrained`` writes it (its config as
    ``to_json_string`` gives it, its state dict in diffusers' key layout with
    ``format: pt``), which ``UNet2DConditionModel.from_pretrained(OUT, subfolder="unet")``
    reads; put in place of the base model's ``unet/`` it makes a diffusers model folder
    (what kohya's scripts read), and ComfyUI's Load Diffusion Model reads the weights file.
dreambooth-lora, diffusers
    ``OUT/pytorch_lora_weights.safetensors``: the run's adapters in the layout
    ``StableDiffusionPipeline.save_lora_weights`` writes (``unet.<module>.lora.down.weight``,
    ``.lora.up.weight``), which ``pipe.load_lora_weights(OUT)`` reads.
dreambooth-lora, a1111 / comfyui / kohya
    ``NAME.safetensors`` in kohya's LoRA layout (``lora_unet_<module>.lora_down.weight``,
    ``.lora_up.weight`` and ``.alpha`` = the rank, since hifi trains with alpha = rank), as
    diffusers' ``convert_state_dict_to_kohya`` writes it: what kohya's sd-scripts write and
    read, what AUTOMATIC1111 reads from ``models/Lora/`` (prompts add ``<lora:NAME:1>``) and
    ComfyUI's LoraLoader from ``models/loras/``; diffusers' ``load_lora_weights`` reads it too.
dreambooth, a1111 / comfyui / kohya
    refused: those tools load a fine-tuned model as one checkpoint in the original LDM key
    layout (UNet, VAE and text encoder together), which hifi does not write.
hifi, every format
    refused: c_s lives in the text encoder's *output* space, which no embedding loader can
    take; :func:`hifi.io.diffusers_compat.pipeline_inputs` feeds it to a stock diffusers
    pipeline (README, "Use a run elsewhere").

Every safetensors file written carries string metadata that names its source:
``hifi_version`` (the hifi that tuned the run), ``class_name``, ``base_model`` (the run's
model id), ``backend``, ``mode`` and ``token`` (the words prompts name the subject with).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import attrs
from torch import Tensor

from hifi.algorithms.subject import PLACEHOLDER
from hifi.errors import HifiError
from hifi.io.images import atomic_path, check_writable
from hifi.io.runs import (
    LORA_FILE,
    TI_FILE,
    Run,
    apply_run,
    embedding_tensors,
    load_run,
    load_tensors,
    save_tensors,
)
from hifi.registry import backend_options, load_backend

__all__ = ["EXPORTS", "FORMATS", "DiffusersUNetBackend", "ExportResult", "Refusal", "Writer", "export_run", "run_kind"]

FORMATS = ("a1111", "comfyui", "kohya", "diffusers")
"""The layouts :func:`export_run` knows, by the tool that reads them."""
EMBEDDING_KEY = "emb_params"
"""The key of the one tensor in an A1111 / ComfyUI / kohya embedding file."""
UNET_DIR = "unet"
UNET_CONFIG = "config.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


@attrs.frozen
class ExportResult:
    """What :func:`export_run` wrote."""

    files: tuple[Path, ...]
    note: str
    """How the tool reads them and how its prompts name the subject (one line)."""


@attrs.frozen
class Writer:
    """How one (mode, format) is written.

    Attributes:
        out: what ``--out`` names: one ``NAME.safetensors`` ``"file"``, or a ``"folder"``.
        write: writes the run at ``--out`` and returns the files written.
        note: how to use them, with ``{out}``, ``{name}`` (the file's stem), ``{words}``
            (how the run's prompts name the subject) and ``{model}`` (the base model) filled in.
    """

    out: Literal["file", "folder"]
    write: Callable[[Run, Path], tuple[Path, ...]]
    note: str


@attrs.frozen
class Refusal:
    """A (mode, format) that cannot be written, and why (one line, saying what to use instead)."""

    reason: str


@runtime_checkable
class _ConfiguredModel(Protocol):
    """A diffusers model: its ``to_json_string`` is the ``config.json`` that ``save_pretrained`` writes."""

    def to_json_string(self) -> str: ...


@runtime_checkable
class DiffusersUNetBackend(Protocol):
    """A backend whose denoiser is a diffusers UNet (what a ``unet/`` folder export needs: its config)."""

    unet: _ConfiguredModel


def _metadata(run: Run, token: str) -> dict[str, str]:
    """The safetensors string metadata that names an exported file's source."""
    meta = run.meta
    return {"hifi_version": meta.version, "class_name": meta.class_name, "base_model": meta.model_id,
            "backend": meta.backend, "mode": meta.mode, "token": token}


def _token_vector(run: Run) -> Tensor:
    vector = run.subject.token_vector
    assert vector is not None, "a classic-ti Subject holds its token vector"
    return vector.float()


def _sdxl(run: Run) -> bool:
    """Whether the run's token vector has one part per SDXL text encoder (the ``clip_l``/``clip_g`` layout)."""
    return run.meta.token_widths is not None and len(run.meta.token_widths) > 1


def _write_diffusers_embedding(run: Run, out: Path) -> tuple[Path, ...]:
    path = out / TI_FILE
    save_tensors(path, embedding_tensors(_token_vector(run), run.meta.token_widths), _metadata(run, PLACEHOLDER))
    return (path,)


def _write_embedding_file(run: Run, out: Path) -> tuple[Path, ...]:
    if _sdxl(run):
        tensors = embedding_tensors(_token_vector(run), run.meta.token_widths)
    else:
        tensors = {EMBEDDING_KEY: _token_vector(run)[None]}
    save_tensors(out, tensors, _metadata(run, out.stem))
    return (out,)


def _write_diffusers_unet(run: Run, out: Path) -> tuple[Path, ...]:
    """The run's backend, its DreamBooth weights applied, saved as a diffusers ``unet/`` folder."""
    backend = load_backend(run.meta.backend, **backend_options(run.meta.model_id))
    if not isinstance(backend, DiffusersUNetBackend) or not isinstance(backend.unet, _ConfiguredModel):
        raise HifiError(f"backend {run.meta.backend!r} has no diffusers UNet, whose config a unet/ folder needs")
    unet = backend.unet
    apply_run(run, backend)
    weights, config_file = out / UNET_DIR / UNET_WEIGHTS, out / UNET_DIR / UNET_CONFIG
    save_tensors(weights, backend.denoiser_state(), {"format": "pt", **_metadata(run, run.subject.subject_words())})
    with atomic_path(config_file) as tmp:
        tmp.write_text(unet.to_json_string())
    return (config_file, weights)


def _lora_state(run: Run) -> dict[str, Tensor]:
    assert run.meta.lora_file is not None, "a dreambooth-lora run names its LoRA file"
    return load_tensors(run.path / run.meta.lora_file)


def _write_diffusers_lora(run: Run, out: Path) -> tuple[Path, ...]:
    path = out / LORA_FILE
    save_tensors(path, _lora_state(run), {"format": "pt", **_metadata(run, run.subject.subject_words())})
    return (path,)


def _write_kohya_lora(run: Run, out: Path) -> tuple[Path, ...]:
    """The adapters in kohya's layout, through diffusers' own PEFT-to-kohya conversion."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    state = _lora_state(run)
    if not all(k.startswith("unet.") for k in state):
        raise HifiError("kohya's LoRA layout (which A1111 and ComfyUI read) is written here for UNet LoRAs only; this"
                        " run's LoRA is on an SD 3 transformer: export it with --format diffusers")
    peft = {k.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight"): v
            for k, v in state.items()}
    save_tensors(out, convert_state_dict_to_kohya(peft), _metadata(run, run.subject.subject_words()))
    return (out,)


def _checkpoint_refusal(tool: str) -> Refusal:
    return Refusal(
        f"{tool} takes a fine-tuned model as one checkpoint in the original LDM key layout (UNet, VAE and text"
        " encoder), which hifi does not write; use --format diffusers (a unet/ folder: diffusers reads it,"
        " kohya's scripts read it in place of the base model's unet/, ComfyUI's Load Diffusion Model reads its"
        " diffusion_pytorch_model.safetensors)"
    )


_OUTPUT_SPACE = Refusal(
    "a hifi run's c_s lives in the text encoder's output space, which no embedding loader can load; use it with"
    " a stock diffusers pipeline through hifi.io.diffusers_compat.pipeline_inputs (README: Use a run elsewhere)"
)

EXPORTS: dict[tuple[str, str], Writer | Refusal] = {  # (run_kind, format)
    ("classic-ti", "diffusers"): Writer(
        "folder", _write_diffusers_embedding,
        "pipe.load_textual_inversion('{out}') reads it; prompts name the subject {words}"),
    ("classic-ti", "a1111"): Writer(
        "file", _write_embedding_file,
        "put it in stable-diffusion-webui/embeddings/; prompts name the subject {name}"),
    ("classic-ti", "comfyui"): Writer(
        "file", _write_embedding_file,
        "put it in ComfyUI/models/embeddings/; prompts name the subject embedding:{name}"),
    ("classic-ti", "kohya"): Writer(
        "file", _write_embedding_file,
        "sd-scripts read it: gen_img_diffusers.py --textual_inversion_embeddings {out} (prompts name the subject"
        " {name}), train_textual_inversion.py --weights {out}"),
    ("dreambooth", "diffusers"): Writer(
        "folder", _write_diffusers_unet,
        "UNet2DConditionModel.from_pretrained('{out}', subfolder='unet') reads it, or put {out}/unet in place of"
        " the unet/ folder of {model}; prompts name the subject '{words}'"),
    ("dreambooth-lora", "diffusers"): Writer(
        "folder", _write_diffusers_lora,
        "pipe.load_lora_weights('{out}') reads it (on {model}); prompts name the subject '{words}'"),
    ("dreambooth-lora", "a1111"): Writer(
        "file", _write_kohya_lora,
        "put it in stable-diffusion-webui/models/Lora/ (on {model}); prompts add <lora:{name}:1> and name the"
        " subject '{words}'"),
    ("dreambooth-lora", "comfyui"): Writer(
        "file", _write_kohya_lora,
        "put it in ComfyUI/models/loras/ and load it with LoraLoader (on {model}); prompts name the subject"
        " '{words}'"),
    ("dreambooth-lora", "kohya"): Writer(
        "file", _write_kohya_lora,
        "sd-scripts read it: gen_img_diffusers.py --network_module networks.lora --network_weights {out}"
        " (on {model}); prompts name the subject '{words}'"),
    ("dreambooth", "a1111"): _checkpoint_refusal("AUTOMATIC1111"),
    ("dreambooth", "comfyui"): _checkpoint_refusal("ComfyUI"),
    ("dreambooth", "kohya"): _checkpoint_refusal("kohya's sd-scripts"),
    **{("hifi", fmt): _OUTPUT_SPACE for fmt in FORMATS},
}
"""What each (:func:`run_kind`, format) writes, or why it cannot be written (the module docstring's table)."""


def run_kind(run: Run) -> str:
    """The first half of a run's :data:`EXPORTS` key: its mode, or ``dreambooth-lora`` for a LoRA DreamBooth run."""
    return "dreambooth-lora" if run.meta.lora_file is not None else run.meta.mode


def _check_out(out: Path, writer: Writer, fmt: str) -> None:
    """Refuse, before any work, an ``--out`` of the wrong kind or one that cannot be written."""
    if writer.out == "file":
        if out.suffix != ".safetensors":
            raise HifiError(f"--format {fmt} writes one embedding file: name it NAME.safetensors (NAME is the"
                            f" trigger word), not {out}")
        if out.is_dir():
            raise HifiError(f"cannot write to {out}: it is a folder; name a NAME.safetensors file")
        check_writable(out, folder=False)
    else:
        if out.suffix == ".safetensors":
            raise HifiError(f"--format {fmt} writes a folder: name a folder, not the file {out}")
        check_writable(out)


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> ExportResult:
    """Write the run in ``run_dir`` at ``out`` in format ``fmt``, one of :data:`FORMATS`.

    What is written for each mode and format is the module docstring's table
    (:data:`EXPORTS`); a file of the same name is replaced. Raises :class:`HifiError`, with
    nothing written, for an unknown format, a missing or unfinished run, a (mode, format)
    that cannot be written (saying why and what to use instead), and an ``out`` of the
    wrong kind or that cannot be written. A DreamBooth export builds the run's backend (its
    recorded backend and model id) for the UNet's config.
    """
    if fmt not in FORMATS:
        raise HifiError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    run = load_run(run_dir)
    kind = run_kind(run)
    entry = EXPORTS.get((kind, fmt))
    if entry is None:
        known = sorted({k for k, _ in EXPORTS})
        raise HifiError(f"hifi export knows no {fmt} layout for a {kind} run (it knows {', '.join(known)} runs)")
    if isinstance(entry, Refusal):
        raise HifiError(f"cannot export the {kind} run {run.path} as --format {fmt}: {entry.reason}")
    target = Path(out)
    _check_out(target, entry, fmt)
    files = entry.write(run, target)
    note = entry.note.format(out=target, name=target.stem, words=run.subject.subject_words(), model=run.meta.model_id)
    if _sdxl(run) and fmt == "diffusers":
        note = (f"hifi.io.diffusers_compat.load_sdxl_embedding(pipe, '{files[0]}') loads it into both text encoders"
                f" of a StableDiffusionXLPipeline; prompts name the subject {run.subject.subject_words()}")
    return ExportResult(files=files, note=note)
