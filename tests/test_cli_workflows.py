"""The workflows under ``hifi generate``, ``edit`` and ``replace``, called as a product would: no printing."""

from __future__ import annotations

import json

import pytest

from hifi.algorithms.null_text import NullTextConfig
from hifi.algorithms.reference import ReferenceSettings
from hifi.errors import HifiError
from hifi.io.images import check_writable
from hifi.io.runs import load_run
from hifi.workflows.edit import edit_photo, replace_in_photo
from hifi.workflows.generate import GenerateSettings, generate_from_run
from test_cli_errors import write_photo
from test_generate_cli import make_run

FAST = NullTextConfig(num_steps=3, inner_steps=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return load_run(make_run(tmp_path_factory.mktemp("run")))


@pytest.fixture
def photo(tmp_path):
    return write_photo(tmp_path)


def test_generate_from_run_returns_what_it_wrote_and_prints_nothing(tiny, run, tmp_path, capsys):
    settings = GenerateSettings(num_images=2, seed=5, reference=ReferenceSettings(num_steps=4, t_start=3, t_end=2,
                                                                                  phi_steps=1))
    result = generate_from_run(tiny, run, ["a dog on the beach"], tmp_path / "out", settings=settings)
    assert capsys.readouterr() == ("", "")
    assert [p.name for p in result.images] == ["a-dog-on-the-beach_seed5.png", "a-dog-on-the-beach_seed6.png"]
    assert all(p.is_file() for p in (*result.images, result.grid, result.metadata))
    assert list(result.records) == json.loads(result.metadata.read_text())["images"]
    assert len(result.lines) == 2 and result.lines[0].startswith("a-dog-on-the-beach_seed5: ")
    assert result.fallbacks == 0


def test_edit_and_replace_return_their_files_and_notes(tiny, run, photo, tmp_path, capsys):
    edited = edit_photo(tiny, photo, "a cat on the grass", "cat", "dog", tmp_path / "e.png", config=FAST,
                        intermediates=True)
    replaced = replace_in_photo(tiny, run, photo, "cat", tmp_path / "r.png", config=FAST)
    assert capsys.readouterr() == ("", "")
    assert [p.name for p in edited.written] == ["e.png", "e.reconstruction.png", "e.before-after.png",
                                                 "e.attention.png", "e.json"]
    assert all(p.is_file() for p in edited.written) and edited.edit.edited_caption == "a dog on the grass"
    assert edited.notes == (f"{photo} is 48x40: edited at 32x32 and resized back to 48x40",)
    assert replaced.written == (tmp_path / "r.png",)
    assert replaced.notes[1] == "no --caption: the template captioner says 'a photo of a cat'"


def test_check_writable_creates_nothing_and_names_what_is_in_the_way(tmp_path):
    check_writable(tmp_path / "a" / "b" / "c")
    check_writable(tmp_path / "a" / "out.png", folder=False)
    assert not any(tmp_path.iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(HifiError, match=r"cannot write to .*file/out: .*file is a file, not a folder"):
        check_writable(tmp_path / "file" / "out")
    with pytest.raises(HifiError, match="is a file, not a folder"):
        check_writable(tmp_path / "file")
    with pytest.raises(HifiError, match="it is a folder; name an image file"):
        check_writable(tmp_path, folder=False)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
