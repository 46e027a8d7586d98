"""benchmarks.toyworld_metric_probe refuses bad folders in one line, before any work."""

from __future__ import annotations

import pytest


def test_metric_probe_refuses_bad_folders(tmp_path, capsys):
    from benchmarks.toyworld_metric_probe import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--work", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "no vae_final" in capsys.readouterr().err
    (tmp_path / "work" / "vae_final").mkdir(parents=True)
    assert main(["--work", str(tmp_path / "work"), "--generator", str(tmp_path / "none"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "no ToyWorld model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
