"""benchmarks.run --markdown: a table written again from a results JSON, and bad files refused clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks import run

RESULTS = Path(run.__file__).parent / "results"


def test_markdown_rewrites_the_committed_table(tmp_path):
    src = RESULTS / "sd14-gpu-bf16-layout.json"
    shutil.copy(src, tmp_path / "r.json")
    assert run.main(["--markdown", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "r.md").read_text() == src.with_suffix(".md").read_text()


def test_markdown_of_a_bad_file_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    assert run.main(["--markdown", str(tmp_path / "bad.json")]) == 2
    assert run.main(["--markdown", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("is not a results JSON") == 2 and "Traceback" not in err
    assert not (tmp_path / "bad.md").exists()
