"""The execution edge: one Execution per run hands out one model wrapper and one runner per loss and shape."""

from __future__ import annotations

import pytest
import torch

from hifi.algorithms.null_text import NullTextConfig, null_text_inversion
from hifi.errors import HifiError
from hifi.execution.edge import Bound, Execution, adam_steps, execution_for
from hifi.kernels.ddim import DdimGrid


def _quadratic(scale: float, p: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor]:
    return (scale * ((p - x) ** 2).sum(),)


def test_bound_losses_are_equal_when_their_function_and_arguments_are():
    assert Bound(_quadratic, 2.0) == Bound(_quadratic, 2.0)
    assert hash(Bound(_quadratic, 2.0)) == hash(Bound(_quadratic, 2.0))
    assert Bound(_quadratic, 2.0) != Bound(_quadratic, 3.0)
    p, x = torch.zeros(3), torch.ones(3)
    assert float(Bound(_quadratic, 2.0)(p, x)[0]) == pytest.approx(6.0)


def test_a_runner_is_made_once_per_loss_and_shape_and_restarted_as_a_fresh_adam():
    execution = Execution("eager")
    x = torch.tensor([1.0, -2.0, 3.0])
    first = execution.runner(Bound(_quadratic, 1.0), torch.zeros(3), 0.1)
    for _ in range(3):
        first(x)
    again = execution.runner(Bound(_quadratic, 1.0), torch.zeros(3), 0.1)
    assert again is first and execution.runners_made == 1
    fresh = adam_steps(Bound(_quadratic, 1.0), torch.zeros(3), 0.1)
    for _ in range(3):
        again(x)
        fresh(x)
    torch.testing.assert_close(again.param, fresh.param)  # a restart is exactly a new Adam
    execution.runner(Bound(_quadratic, 2.0), torch.zeros(3), 0.1)
    execution.runner(Bound(_quadratic, 1.0), torch.zeros(4), 0.1)
    execution.runner(Bound(_quadratic, 1.0), torch.zeros(3), 0.2)
    assert execution.runners_made == 4


def test_the_model_wrapper_is_built_once_per_function(tiny):
    execution = Execution("compile")
    assert execution.model(tiny.denoise) is execution.model(tiny.denoise)
    assert Execution("eager").model(tiny.denoise) == tiny.denoise


def test_one_execution_serves_every_image_with_the_numbers_of_separate_runs(tiny):
    grid = DdimGrid.build(tiny.schedule, 3)
    config = NullTextConfig(num_steps=3, inner_steps=2)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(2)]
    with torch.no_grad():
        cond = tiny.encode_text(["a photo of a dog"])
    phi = tiny.null_embedding()
    shared = Execution("eager")
    together = [null_text_inversion(shared.model(tiny.denoise), grid, x, cond, phi, config, optimiser=shared.runner)
                for x in images]
    assert shared.runners_made == 1
    for x, inverted in zip(images, together, strict=True):
        alone = null_text_inversion(tiny.denoise, grid, x, cond, phi, config)
        torch.testing.assert_close(torch.stack([p.sequence for p in inverted.phis]),
                                   torch.stack([p.sequence for p in alone.phis]))
        torch.testing.assert_close(inverted.reconstruction, alone.reconstruction)


def test_execution_for_refuses_a_mode_the_device_cannot_run(tiny):
    assert execution_for(tiny, "eager").mode == "eager"
    if not torch.cuda.is_available():
        with pytest.raises(HifiError, match="needs a CUDA device"):
            execution_for(tiny, "graph")
    with pytest.raises(HifiError, match="unknown --accel"):
        execution_for(tiny, "fast")
