"""benchmarks.run.core_rows: both UNet layouts timed in one run, and the backend left as it was."""

from __future__ import annotations

import pytest


def test_core_rows_times_both_layouts_and_restores_the_layout(tiny):
    from benchmarks.run import Stages, core_rows

    rows = core_rows(tiny, Stages(tiny, 1, 2), "eager", repeats=1)
    stages = [r["stage"] for r in rows]
    assert len(rows) == 4 and sum("channels-last" in s for s in stages) == 2
    assert all(r["seconds"] > 0 and r["naive_seconds"] > 0 for r in rows)
    assert not tiny.channels_last


def test_core_rows_restores_the_layout_when_a_row_fails(tiny, monkeypatch):
    import benchmarks.run as run

    calls = []

    def failing(backend, fn, repeats, warmup=1):
        calls.append(backend.channels_last)
        if backend.channels_last:
            raise RuntimeError("out of memory")
        return 0.01

    monkeypatch.setattr(run, "timed", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        run.core_rows(tiny, run.Stages(tiny, 1, 2), "eager", repeats=1)
    assert calls[-1] is True and not tiny.channels_last
