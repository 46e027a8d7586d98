"""Words the backend's tokenizer does not know: the capability, and one warning before the work."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import hifi.cli.demo
import hifi.cli.edit
import hifi.cli.generate
import hifi.cli.replace
import hifi.cli.tune
import hifi_backends.diffusers_backend
from hifi import load_backend
from hifi.algorithms.subject import PLACEHOLDER
from hifi.cli import main
from hifi.errors import HifiError
from hifi.io.synthetic import draw_subject_photos
from hifi.protocols.denoiser import VocabularyBackend
from hifi.workflows.checks import unknown_word_warnings
from test_cli_errors import write_photo
from test_generate_cli import make_run

STOPPED = "stopped where the work would start"


def test_a_word_list_tokenizer_knows_only_its_words():
    backend = load_backend("tiny", seed=0)
    assert isinstance(backend, VocabularyBackend)
    assert backend.unknown_words(["a photo of a Mug on the beach", "a dog's ball", "a MUG"]) == ("mug", "ball")
    assert backend.unknown_words([f"a {PLACEHOLDER} dog"]) == ("hifi", "subject")
    backend.add_placeholder_token(PLACEHOLDER)
    assert backend.unknown_words([f"a {PLACEHOLDER} dog"]) == (), "an added token is known"


def test_a_full_size_vocabulary_knows_a_word_from_its_pieces(monkeypatch):
    backend = load_backend("tiny", seed=0)
    monkeypatch.setattr(hifi_backends.diffusers_backend, "OPEN_VOCABULARY", len(backend.tokenizer))
    assert backend.unknown_words(["a mug with stripes"]) == ()


def test_prompt_lengths_are_untruncated(tiny):
    assert tiny.prompt_lengths(["a cat " * 40, "a photo of a dog", ""]) == (80, 5, 0)


def test_one_warning_names_every_unknown_word(tiny):
    (line,) = unknown_word_warnings(tiny, ["a <subject> on the moon"], "mug")
    assert line == ("backend 'tiny' does not know the words 'mug', 'moon': its tokenizer has no token for them,"
                    " so the model cannot draw what they name")
    assert unknown_word_warnings(tiny, ["a photo of a <subject> on the beach"], "dog") == ()
    assert unknown_word_warnings(SimpleNamespace(name="other"), ["a mug"], "mug") == (), "no capability, no check"


def stop(*args, **kwargs):
    raise HifiError(STOPPED)


def warned_first(argv, capsys, *expected):
    """Run the command with its workflow stopped; the warnings came before it."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == f"hifi: error: {STOPPED}"
    warnings = [line for line in lines[:-1] if line.startswith("hifi: warning: ")]
    for text in expected:
        assert any(text in w for w in warnings), (text, lines)
    return warnings


@pytest.fixture
def photo(tmp_path):
    return write_photo(tmp_path)


def test_generate_warns_before_drawing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hifi.cli.generate, "generate_from_run", stop)
    run = make_run(tmp_path / "run")
    warned_first(["generate", "--run", str(run), "--prompt", "a <subject> on the moon", "--out", str(tmp_path / "o"),
                  "--steps", "4", "--no-reference"], capsys, "does not know the word 'moon'")


def test_edit_and_replace_warn_before_the_inversion(tmp_path, photo, capsys, monkeypatch):
    monkeypatch.setattr(hifi.cli.edit, "edit_photo", stop)
    monkeypatch.setattr(hifi.cli.replace, "replace_in_photo", stop)
    fast = ["--out", str(tmp_path / "o.png"), "--ddim-steps", "3"]
    warned_first(["edit", "--image", str(photo), "--caption", "a cat on the lawn", "--source-word", "cat",
                  "--target-word", "hamster", *fast], capsys, "the words 'lawn', 'hamster'")
    run = make_run(tmp_path / "run")
    warned_first(["replace", "--run", str(run), "--image", str(photo), "--caption", "a hamster on the grass",
                  "--source-word", "hamster", *fast], capsys, "the word 'hamster'")


def test_tune_warns_about_its_class_word(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hifi.cli.tune, "tune_to_run", stop)
    photos, _ = draw_subject_photos(tmp_path)
    warned_first(["tune", "--subject", str(photos), "--class-name", "mug", "--out", str(tmp_path / "run"),
                  "--ddim-steps", "3"], capsys, "does not know the word 'mug'")


def test_demo_on_photos_says_what_the_toy_world_can_show(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hifi.cli.demo, "run_demo", stop)
    photos, _ = draw_subject_photos(tmp_path)
    warnings = warned_first(["demo", "--photos", str(photos), "--class-name", "can", "--out", str(tmp_path / "d")],
                            capsys, "backend 'toy' does not know the word 'can'",
                            "the toy backend is ToyWorld's model", "hifi demo --backend sd14 --model")
    assert len(warnings) == 2
    # its own subject needs neither line
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in lines if line.startswith("hifi:")] == [f"hifi: error: {STOPPED}"]
