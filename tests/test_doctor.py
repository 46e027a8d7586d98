"""``hifi doctor`` and the report under it: what is configured, what is here, on which device."""

from __future__ import annotations

import json

import pytest

from hifi.cli import main
from hifi.perception.doctor import doctor_report, runtime_versions
from hifi.perception.models import ModelSlot, locate_model
from hifi.perception.registry import available_perception


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HIFI_SAM_MODEL", "HIFI_SAM_CHECKPOINT", "HIFI_GROUNDING_DINO_MODEL", "HIFI_DINO_MODEL",
                "HIFI_CLIP_MODEL", "HIFI_BLIP2_MODEL", "HIFI_BLIP_MODEL", "HIFI_SD_MODEL", "HIFI_SDXL_MODEL",
                "HIFI_SD3_MODEL"):
        monkeypatch.delenv(var, raising=False)


def _rows(name: str) -> list[dict[str, str]]:
    return [r for r in doctor_report() if r["name"] == name]


def test_every_model_and_backend_has_a_row():
    names = {(r["kind"], r["name"]) for r in doctor_report()}
    for kind, found in available_perception().items():
        assert {(kind[:-1], n) for n in found} <= names
    assert {("backend", "tiny"), ("backend", "sd14"), ("backend", "sd14-fp16")} <= names


def test_rows_say_where_each_source_comes_from(tmp_path, monkeypatch):
    (dino,) = _rows("dino")
    assert (dino["model"], dino["configured"]) == ("facebook/dino-vits16", "default")
    assert dino["found"].startswith("missing") or dino["found"] == "hub cache"
    monkeypatch.setenv("HIFI_DINO_MODEL", str(tmp_path))
    monkeypatch.setenv("HIFI_SAM_CHECKPOINT", str(tmp_path / "sam_vit_b.pth"))
    (dino,) = _rows("dino")
    assert (dino["model"], dino["configured"], dino["found"]) == (str(tmp_path), "$HIFI_DINO_MODEL", "folder")
    sam, detector = _rows("sam")
    assert sam["configured"] == "$HIFI_SAM_CHECKPOINT" and sam["found"] == "missing: no such file or folder"
    assert detector["what"] == "Grounding DINO"
    (sd,) = _rows("sd14")
    assert sd["configured"] == "not configured: set $HIFI_SD_MODEL"
    (template,) = _rows("template")
    assert template["configured"] == "nothing to configure"
    assert {r["device"] for r in doctor_report()} <= {"cpu", "cuda"}


def test_the_bundled_toyworld_models_are_reported_as_bundled(capsys):
    """ToyWorld's diffusion and perception models are trained and ship in the package: neither random nor
    weight-free, and found in the bundle folder."""
    from hifi_backends.toy.backend import BUNDLE

    for name in ("toy", "toy-seg", "toy-id", "toyclip"):
        (row,) = _rows(name)
        assert row["what"] not in ("random weights", "no weights") and "trained" in row["what"]
        assert (row["model"], row["configured"], row["found"]) == (str(BUNDLE), "bundled", "folder")
    (tiny,) = _rows("tiny")
    assert tiny["what"] == "random weights"
    assert main(["doctor"]) == 0
    (toy,) = [line for line in capsys.readouterr().out.splitlines() if line.split()[:2] == ["backend", "toy"]]
    assert "bundled" in toy and str(BUNDLE) in toy and "random" not in toy


def test_locate_model_looks_without_loading(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert locate_model("random:tiny") == "random"
    assert locate_model(str(tmp_path)) == "folder"
    assert locate_model(str(weights)) == "file"
    assert locate_model("/no/such/file.pth").startswith("missing: no such file")
    assert locate_model("hifi-test/never-cached").startswith("missing: not in the hub cache")
    assert locate_model(None) == "-"


def test_slot_order_option_then_variable_then_default(monkeypatch):
    slot = ModelSlot("X", "HIFI_TEST_X", "org/x")
    assert slot.configured() == ("org/x", "default")
    monkeypatch.setenv("HIFI_TEST_X", "/here")
    assert slot.configured() == ("/here", "$HIFI_TEST_X")
    assert slot.configured("given") == ("given", "option")


def test_versions_name_the_stack():
    versions = runtime_versions()
    assert {"torch", "diffusers", "transformers", "device"} <= set(versions)
    assert versions["device"] in ("cpu", "cuda")


def test_the_command_prints_the_report(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "transformers:" in out and "grounded-sam" in out and "HIFI_SD_MODEL" in out
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] and any(r["name"] == "blip2" for r in report["models"])
