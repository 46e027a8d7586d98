"""The fast path (hifi.fastpath): every mode gives the eager numbers, and says clearly what it cannot do."""

from __future__ import annotations

import pytest
import torch

from hifi.errors import HifiError
from hifi.fastpath import AdamStep, check_accel


def _quadratic(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    residual = torch.tanh(x @ p) - y
    loss = (residual**2).mean()
    return loss, residual.abs().max()


def _run(accel: str, steps: int = 6, device: str = "cpu") -> tuple[torch.Tensor, list[float]]:
    g = torch.Generator().manual_seed(0)
    p = torch.randn(8, 3, generator=g).to(device).requires_grad_(True)
    step = AdamStep(_quadratic, p, lr=0.05, accel=accel)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=g).to(device), torch.randn(16, 3, generator=g).to(device)
        losses.append(float(step(x, y)[0]))
    return p.detach().cpu(), losses


def test_eager_step_is_plain_adam():
    p, losses = _run("eager")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 3, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([q], lr=0.05)
    for expected in losses:
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 3, generator=g)
        loss = _quadratic(q, x, y)[0]
        assert float(loss) == pytest.approx(expected, rel=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(p, q.detach())


def test_compiled_step_matches_eager():
    p_eager, l_eager = _run("eager")
    p_compiled, l_compiled = _run("compile")
    assert l_compiled == pytest.approx(l_eager, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(p_compiled, p_eager, rtol=1e-5, atol=1e-6)


def test_restart_is_a_fresh_adam():
    g = torch.Generator().manual_seed(1)
    p = torch.zeros(8, 3).requires_grad_(True)
    step = AdamStep(_quadratic, p, lr=0.05)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 3, generator=g)
    step(x, y)
    step(x, y)
    step.restart(torch.zeros(8, 3))
    step(x, y)
    fresh = torch.zeros(8, 3).requires_grad_(True)
    AdamStep(_quadratic, fresh, lr=0.05)(x, y)
    torch.testing.assert_close(p.detach(), fresh.detach())


def test_modes_a_device_cannot_run_are_clear_errors():
    with pytest.raises(HifiError, match="unknown --accel 'fast'"):
        check_accel("fast", "cpu")
    with pytest.raises(HifiError, match="needs a CUDA device"):
        AdamStep(_quadratic, torch.zeros(8, 3, requires_grad=True), lr=0.1, accel="graph")
    with pytest.raises(HifiError, match="leaf tensor"):
        AdamStep(_quadratic, torch.zeros(8, 3), lr=0.1)


def _tune(accel: str, device: str = "cpu"):
    from hifi.algorithms.tune import TuneConfig, tune
    from hifi.registry import load_backend

    backend = load_backend("tiny", device=device)
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(3, 3, backend.resolution, backend.resolution, generator=g) * 2 - 1).to(device)
    config = TuneConfig(steps=4, stepwise_steps=2, num_steps=2, accel=accel)
    return tune(backend, images, "dog", config=config)


def test_tune_with_compiled_steps_matches_eager():
    eager, compiled = _tune("eager"), _tune("compile")
    assert [r["loss"] for r in compiled.losses] == pytest.approx([r["loss"] for r in eager.losses], rel=1e-4)
    torch.testing.assert_close(compiled.subject.c_s, eager.subject.c_s, rtol=1e-4, atol=1e-5)
    for t, c_t in eager.subject.stepwise.items():
        torch.testing.assert_close(compiled.subject.stepwise[t], c_t, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (CI has none)")
def test_graph_step_matches_eager_on_cuda():
    p_eager, l_eager = _run("eager", device="cuda")
    p_graph, l_graph = _run("graph", device="cuda")
    assert l_graph == pytest.approx(l_eager, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(p_graph, p_eager, rtol=1e-4, atol=1e-5)
    eager, graph = _tune("eager", "cuda"), _tune("graph", "cuda")
    torch.testing.assert_close(graph.subject.c_s.cpu(), eager.subject.c_s.cpu(), rtol=1e-3, atol=1e-4)


def test_the_commands_pass_accel_on_and_refuse_graph_without_cuda(tmp_path, capsys):
    from hifi.cli import main
    from hifi.evaluation import METHODS, EvalSettings
    from hifi.synthetic import draw_subject_photos

    assert EvalSettings(accel="compile").tune_config(METHODS["hifi"]).accel == "compile"
    photos, _ = draw_subject_photos(tmp_path / "photos")
    code = main(["tune", "--subject", str(photos), "--class-name", "box", "--out", str(tmp_path / "run"),
                 "--backend", "tiny", "--steps", "2", "--accel", "graph", "--quiet"])
    assert code == 2 and "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
