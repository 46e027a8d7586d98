"""A user's mistake is one line on stderr and exit 2, found before the work, leaving nothing behind.

Every case here once reached a kernel or torch (a traceback), or ran a whole tune or
inversion before failing; each is now refused at the edge (the command line or its
workflow). Outputs are checked before any model loads: the ``no_model`` fixture fails the
test if one does.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import hifi.cli.common
from hifi.algorithms.subject import Subject
from hifi.cli import main
from hifi.io.runs import RunMeta, save_run
from hifi.io.synthetic import draw_subject_photos
from hifi.toyworld.subjects import export_dataset
from test_generate_cli import make_run

FAST_GENERATE = ["--num-images", "1", "--steps", "4", "--t-start", "3", "--t-end", "2", "--phi-steps", "1", "--quiet"]
FAST_EDIT = ["--ddim-steps", "3", "--inner-steps", "1", "--quiet"]
FAST_TUNE = ["--backend", "tiny", "--steps", "2", "--stepwise-steps", "1", "--ddim-steps", "3", "--samples", "0",
             "--quiet"]
FAST_EVAL = ["--subjects", "striped_mug", "--prompts", "1", "--images-per-prompt", "1", "--steps", "2",
             "--stepwise-steps", "1", "--ddim-steps", "4", "--t-start", "3", "--t-end", "2", "--phi-steps", "1",
             "--dino-model", "random:tiny", "--clip-model", "random:tiny", "--quiet"]
FAST_DEMO = ["--backend", "tiny", "--steps", "2", "--stepwise-steps", "1", "--ddim-steps", "4", "--t-start", "3",
             "--t-end", "2", "--phi-steps", "1", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A run of a model with another text width (as a run of another backend is)."""
    folder = tmp_path_factory.mktemp("wide")
    meta = RunMeta(
        backend="tiny", model_id="random:tiny:0", mode="hifi", class_name="dog", caption="a photo of a dog",
        num_tokens=5, text_width=64, max_length=24, schedule={}, num_steps=4, sources=(), masks="none",
    )
    save_run(folder, Subject("dog", c_s=torch.zeros(5, 64)), meta)
    return folder


def write_photo(folder):
    """A 48x40 photo (not square: it is resized for the backend and back)."""
    path = folder / "cat.png"
    Image.new("RGB", (48, 40), (60, 160, 70)).save(path)
    return path


@pytest.fixture
def photo(tmp_path):
    return write_photo(tmp_path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return draw_subject_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return export_dataset(tmp_path_factory.mktemp("data"), ["striped_mug"])[0]


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(hifi.cli.common, "load_backend", refuse)


@pytest.fixture
def command_line(run_dir, photo, photos, dataset):
    """``command_line(command, out, run)``: a command line that works, writing to ``out``."""
    def build(command, out, run=run_dir):
        return {
            "generate": ["generate", "--run", str(run), "--prompt", "a dog", "--out", str(out), *FAST_GENERATE],
            "edit": ["edit", "--image", str(photo), "--caption", "a cat on the grass", "--source-word", "cat",
                     "--target-word", "dog", "--out", str(out / "e.png"), *FAST_EDIT],
            "replace": ["replace", "--run", str(run), "--image", str(photo), "--source-word", "cat", "--out",
                        str(out / "e.png"), *FAST_EDIT],
            "tune": ["tune", "--subject", str(photos[0]), "--class-name", "dog", "--masks", str(photos[1]),
                     "--out", str(out), *FAST_TUNE],
            "eval": ["eval", "--dataset", str(dataset), "--out", str(out), "--backend", "tiny", *FAST_EVAL],
            "demo": ["demo", "--out", str(out), *FAST_DEMO],
        }[command]

    return build


def one_line_error(argv, capsys, message):
    """Run the command; it must exit 2 with exactly one line, the error, naming ``message``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hifi: error: "), err
    assert message in lines[0]


STEPS = "(the DDIM steps T) must be in 1..1000, the model's training timesteps; got 5000"
TOO_LONG = "is 24 tokens, but backend 'tiny' reads 24 positions, less a start and an end token"
CASES = [
    ("generate", ["--steps", "5000"], f"--steps {STEPS}"),
    ("generate", ["--steps", "0", "--no-reference"], "--steps (the DDIM steps T) must be in 1..1000"),
    ("generate", ["--seed", "-1"], "--seed must be a whole number in 0..18446744073709551615, got -1"),
    ("generate", ["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    ("generate", ["--phi-lr", "inf"], "--phi-lr must be a finite number, got inf"),
    ("generate", ["--num-images", "0"], "--num-images must be at least 1, got 0"),
    ("generate", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("generate", ["--model", "random:tiny:notanumber"], "random:tiny or random:tiny:SEED"),
    ("generate", ["--prompt", "a dog " * 12], f"{TOO_LONG} and the last 5 for c_s (--tokens): shorten it"),
    ("edit", ["--source-word", "horse"], "the source word 'horse' is not in the caption 'a cat on the grass'"),
    ("edit", ["--ddim-steps", "5000"], f"--ddim-steps {STEPS}"),
    ("edit", ["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    ("edit", ["--lr", "nan"], "--lr must be a finite number, got nan"),
    ("edit", ["--tolerance", "inf"], "--tolerance must be a finite number, got inf"),
    ("edit", ["--caption", "a cat " * 12], f"{TOO_LONG}: shorten it to at most 22 tokens"),
    ("edit", ["--image", "missing.png"], "no such image: missing.png"),
    ("replace", ["--ddim-steps", "5000"], f"--ddim-steps {STEPS}"),
    ("replace", ["--caption", "a cat " * 10], "--caption with the subject for 'cat', 'a dog a cat a cat"),
    ("replace", ["--lr", "-1"], "lr > 0"),
    ("tune", ["--ddim-steps", "5000"], f"--ddim-steps {STEPS}"),
    ("tune", ["--tokens", "30"], "the last 30 for c_s (--tokens): lower --tokens"),
    ("tune", ["--class-name", "big " * 20], "--class-name: the tune's caption 'a photo of a big big"),
    ("tune", ["--seed", "-1"], "--seed must be a whole number in 0.."),
    ("tune", ["--lr", "inf"], "--lr must be a finite number, got inf"),
    ("tune", ["--model", "random:tiny:x"], "random:tiny or random:tiny:SEED"),
    ("eval", ["--ddim-steps", "5000"], f"--ddim-steps {STEPS}"),
    ("eval", ["--t-start", "9"], "t_s (--t-start) must be a denoising step index in 1..T = 1..4, got 9"),
    ("eval", ["--seed", "-1"], "--seed must be a whole number in 0.."),
    ("eval", ["--lr", "nan"], "--lr must be a finite number, got nan"),
    ("demo", ["--ddim-steps", "5000"], f"--ddim-steps {STEPS}"),
    ("demo", ["--t-start", "9"], "t_s (--t-start) must be a denoising step index in 1..T = 1..4, got 9"),
    ("demo", ["--class-name", "big " * 20], "--class-name: the tune's caption"),
]


@pytest.mark.parametrize(("command", "flags", "message"), CASES)
def test_bad_input_is_refused_before_the_work_and_leaves_nothing(command_line, tmp_path, capsys, command, flags,
                                                                 message):
    out = tmp_path / "out"
    one_line_error([*command_line(command, out), *flags], capsys, message)
    assert not out.exists()


@pytest.mark.parametrize("command", ["generate", "replace"])
def test_a_run_of_another_model_is_one_line(command_line, wide_run, tmp_path, capsys, command):
    one_line_error(command_line(command, tmp_path / "out", wide_run), capsys,
                   "does not fit backend 'tiny' (random:tiny:0): text width 64 vs 32")
    assert not (tmp_path / "out").exists()


def bad_mask_folder(photos, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for mask in photos[1].iterdir():
        (masks / mask.name).write_bytes(mask.read_bytes())
    (masks / "photo1.png").write_text("not an image")
    return masks


def test_a_mask_folder_with_a_non_image_is_one_line(command_line, photos, tmp_path, capsys):
    argv = [*command_line("tune", tmp_path / "run"), "--masks", str(bad_mask_folder(photos, tmp_path))]
    one_line_error(argv, capsys, "photo1.png as an image")


def test_a_mask_folder_with_a_non_image_leaves_no_run_folder(command_line, photos, tmp_path):
    out = tmp_path / "run"
    assert main([*command_line("tune", out), "--masks", str(bad_mask_folder(photos, tmp_path))]) == 2
    assert not out.exists()


# Outputs that cannot be written ----------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "edit", "replace", "tune", "eval", "demo"])
def test_an_output_under_a_file_is_refused_before_any_model_loads(command_line, tmp_path, capsys, no_model, command):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    out = blocker / "out"
    one_line_error(command_line(command, out), capsys, f"cannot write to {out}")
    assert blocker.read_text() == "a file where a folder should be"


def test_an_output_file_that_is_a_folder_is_refused(photo, tmp_path, capsys, no_model):
    argv = ["edit", "--image", str(photo), "--caption", "a cat", "--source-word", "cat", "--target-word", "dog",
            "--out", str(tmp_path), *FAST_EDIT]
    one_line_error(argv, capsys, "it is a folder; name an image file")


def test_a_flag_argparse_refuses_is_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--run", "r", "--prompt", "p", "--out", "o", "--steps", "abc"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == "hifi: error: argument --steps: invalid int value: 'abc' (see hifi generate --help)\n"
