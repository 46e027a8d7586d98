"""``hifi export``: each writable (mode, format) in the layout its tool reads, and each refusal as one line."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

import hifi.workflows.export
from hifi import HifiError, __version__, load_backend
from hifi.algorithms.subject import PLACEHOLDER
from hifi.cli import main
from hifi.io.runs import LORA_FILE, apply_run, load_run
from hifi.io.synthetic import draw_subject_photos
from hifi.workflows.export import EXPORTS, FORMATS, Refusal, export_run
from test_cli_errors import one_line_error
from test_generate_cli import make_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run of each mode: classic-ti and dreambooth tuned by ``hifi tune``, hifi written as it writes one."""
    folder = tmp_path_factory.mktemp("runs")
    photos, masks = draw_subject_photos(folder / "photos")
    for mode, extra in (("classic-ti", []), ("dreambooth", []), ("dreambooth-lora", ["--lora-rank", "2"])):
        assert main(["tune", "--subject", str(photos), "--class-name", "dog", "--masks", str(masks), "--out",
                     str(folder / mode), "--mode", mode.removesuffix("-lora"), "--lr", "1e-3", "--steps", "2",
                     "--samples", "0", "--quiet", *extra]) == 0
    (folder / "hifi").mkdir()
    make_run(folder / "hifi")
    return folder


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _source_metadata(token):
    return {"hifi_version": __version__, "class_name": "dog", "base_model": "random:tiny:0", "backend": "tiny",
            "token": token}


def _pipeline(backend):
    pipe = StableDiffusionPipeline(
        vae=backend.vae, text_encoder=backend.text_encoder, tokenizer=backend.tokenizer, unet=backend.unet,
        scheduler=DDIMScheduler.from_config(backend.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_mode_and_format_has_one_entry():
    assert set(EXPORTS) == {(m, f) for m in ("hifi", "classic-ti", "dreambooth", "dreambooth-lora") for f in FORMATS}
    assert len(REFUSED) == 7  # hifi in every format, dreambooth in all but diffusers


def test_classic_ti_diffusers_is_diffusers_embedding_file(runs, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(runs / "classic-ti"), "--format", "diffusers", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"wrote {out / 'learned_embeds.safetensors'}"
    tensors, metadata = _read(out / "learned_embeds.safetensors")
    vector = load_run(runs / "classic-ti").subject.token_vector
    assert list(tensors) == [PLACEHOLDER] and tensors[PLACEHOLDER].shape == (32,)
    assert tensors[PLACEHOLDER].dtype == torch.float32
    torch.testing.assert_close(tensors[PLACEHOLDER], vector)
    assert metadata == {**_source_metadata(PLACEHOLDER), "mode": "classic-ti"}
    pipe = _pipeline(load_backend("tiny", seed=0))
    pipe.load_textual_inversion(str(out))  # the folder: diffusers finds learned_embeds.safetensors in it
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(PLACEHOLDER)]
    torch.testing.assert_close(row, vector)


@pytest.mark.parametrize("fmt", ["a1111", "comfyui", "kohya"])
def test_classic_ti_embedding_file_is_emb_params_named_by_its_file(runs, tmp_path, capsys, fmt):
    out = tmp_path / "embeddings" / "hifi-dog.safetensors"
    assert main(["export", str(runs / "classic-ti"), "--format", fmt, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0] == f"wrote {out}" and "hifi-dog" in stdout[1]
    assert [p.name for p in out.parent.iterdir()] == ["hifi-dog.safetensors"]
    tensors, metadata = _read(out)
    vector = load_run(runs / "classic-ti").subject.token_vector
    assert list(tensors) == ["emb_params"]
    assert tensors["emb_params"].shape == (1, 32) and tensors["emb_params"].dtype == torch.float32
    torch.testing.assert_close(tensors["emb_params"][0], vector)
    assert metadata == {**_source_metadata("hifi-dog"), "mode": "classic-ti"}
    # diffusers' loader takes a one-key file as the vector (the token named as the tools name it: the file's stem)
    pipe = _pipeline(load_backend("tiny", seed=0))
    pipe.load_textual_inversion(str(out), token=out.stem)
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("hifi-dog")]
    torch.testing.assert_close(row, vector)


def test_dreambooth_diffusers_is_a_unet_folder_that_draws_as_the_run(runs, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(runs / "dreambooth"), "--format", "diffusers", "--out", str(out)]) == 0
    assert "'sks dog'" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((out / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    tensors, metadata = _read(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert metadata == {**_source_metadata("sks dog"), "mode": "dreambooth", "format": "pt"}
    assert all(v.dtype == torch.float32 for v in tensors.values())
    stock = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    tuned, base = load_backend("tiny", seed=0), load_backend("tiny", seed=0)
    assert set(tensors) == set(tuned.denoiser_state())
    apply_run(load_run(runs / "dreambooth"), tuned)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = tuned.encode_text(["a sks dog"])
        ours = tuned.denoise(x, 500, cond)
        torch.testing.assert_close(stock(x, 500, encoder_hidden_states=cond.sequence).sample, ours)
        assert not torch.allclose(base.denoise(x, 500, cond), ours, atol=1e-4), "the fine-tuned weights differ"


def test_the_workflow_returns_what_it_wrote(runs, tmp_path):
    result = export_run(runs / "classic-ti", "kohya", tmp_path / "dog.safetensors")
    assert result.files == (tmp_path / "dog.safetensors",)
    assert "--textual_inversion_embeddings" in result.note and "dog" in result.note
    with pytest.raises(HifiError, match="unknown --format 'invokeai'; choose from a1111, comfyui, kohya, diffusers"):
        export_run(runs / "classic-ti", "invokeai", tmp_path / "x")


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the export was refused")

    monkeypatch.setattr(hifi.workflows.export, "load_backend", refuse)


REFUSED = sorted(key for key, entry in EXPORTS.items() if isinstance(entry, Refusal))


@pytest.mark.parametrize(("mode", "fmt"), REFUSED)
def test_a_refused_mode_and_format_is_one_line_and_writes_nothing(runs, tmp_path, capsys, no_model, mode, fmt):
    out = tmp_path / "out.safetensors"
    message = "output space" if mode == "hifi" else "original LDM key layout"
    one_line_error(["export", str(runs / mode), "--format", fmt, "--out", str(out)], capsys, message)
    assert not out.exists()


def test_the_refusals_say_what_to_use_instead(runs, tmp_path):
    with pytest.raises(HifiError, match=r"hifi\.io\.diffusers_compat\.pipeline_inputs.*Use a run elsewhere"):
        export_run(runs / "hifi", "diffusers", tmp_path / "out")
    with pytest.raises(HifiError, match="use --format diffusers"):
        export_run(runs / "dreambooth", "comfyui", tmp_path / "out.safetensors")


def test_bad_exports_are_one_line_and_write_nothing(runs, tmp_path, capsys, no_model):
    ti = str(runs / "classic-ti")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "unfinished" / "checkpoint").mkdir(parents=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    make_run(plain, mode="plain")
    cases = [
        ([ti, "--format", "invokeai", "--out", str(tmp_path / "a")], "unknown --format 'invokeai'"),
        ([str(tmp_path / "missing"), "--format", "kohya", "--out", str(tmp_path / "a.safetensors")],
         "is not a finished hifi run: run.json is missing"),
        ([str(tmp_path / "unfinished"), "--format", "kohya", "--out", str(tmp_path / "a.safetensors")],
         "a tune in progress? rerun it with --resume"),
        ([str(plain), "--format", "diffusers", "--out", str(tmp_path / "a")],
         "knows no diffusers layout for a plain run (it knows classic-ti, dreambooth, dreambooth-lora, hifi runs)"),
        ([ti, "--format", "a1111", "--out", str(tmp_path / "a")], "name it NAME.safetensors"),
        ([ti, "--format", "diffusers", "--out", str(tmp_path / "a.safetensors")], "writes a folder"),
        ([ti, "--format", "comfyui", "--out", str(tmp_path / "folder.safetensors")], "it is a folder"),
        ([ti, "--format", "kohya", "--out", str(blocker / "dog.safetensors")], f"cannot write to {blocker}"),
        ([ti, "--format", "diffusers", "--out", str(blocker / "out")], f"cannot write to {blocker}"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, message in cases:
        one_line_error(["export", *argv], capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not any((tmp_path / "folder.safetensors").iterdir())
    assert blocker.read_text() == "a file where a folder should be"


def _lora_unet_output(run_dir, load):
    """The tiny UNet's output with a LoRA put on it by a stock diffusers loader (``load(pipe)``)."""
    backend = load_backend("tiny", seed=0)
    pipe = _pipeline(backend)
    load(pipe)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = backend.encode_text(["a sks dog"])
        return pipe.unet(x, 500, encoder_hidden_states=cond.sequence).sample


@pytest.mark.parametrize("fmt", ["diffusers", "a1111", "comfyui", "kohya"])
def test_a_lora_run_exports_in_each_layout_and_stock_diffusers_reads_it(runs, tmp_path, fmt):
    run_dir = runs / "dreambooth-lora"
    out = tmp_path / ("export" if fmt == "diffusers" else "hifi-dog.safetensors")
    result = export_run(run_dir, fmt, out)
    tensors, metadata = _read(result.files[0])
    assert metadata["mode"] == "dreambooth" and metadata["token"] == "sks dog"
    if fmt == "diffusers":
        assert result.files == (out / LORA_FILE,)
        assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in tensors)
    else:
        downs = [k for k in tensors if k.endswith(".lora_down.weight")]
        assert downs and all(k.startswith("lora_unet_") for k in tensors)
        assert {k for k in tensors} == {k.replace("lora_down.weight", part) for k in downs
                                        for part in ("lora_down.weight", "lora_up.weight", "alpha")}
        assert all(float(tensors[k.replace("lora_down.weight", "alpha")]) == 2.0 for k in downs)  # alpha = rank
        assert all(tensors[k].shape[0] == 2 for k in downs)
    reference = _lora_unet_output(run_dir, lambda pipe: pipe.load_lora_weights(str(run_dir)))
    exported = _lora_unet_output(run_dir, lambda pipe: pipe.load_lora_weights(str(result.files[0])))
    torch.testing.assert_close(exported, reference, rtol=1e-5, atol=1e-6)
    plain = _lora_unet_output(run_dir, lambda pipe: None)
    assert not torch.allclose(plain, reference, atol=1e-6), "the LoRA changes the UNet's output"
