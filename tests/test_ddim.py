"""The DDIM kernels (Eq. 1 and 3) against diffusers' schedulers, and inversion round trips."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from hifi.algorithms.sampling import ddim_invert, ddim_sample
from hifi.kernels.condition import Condition
from hifi.kernels.ddim import (
    DdimGrid,
    Level,
    Schedule,
    add_noise,
    cfg_combine,
    ddim_inverse_step,
    ddim_step,
    ddim_timesteps,
    predict_x0_and_eps,
    training_target,
)

SD_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
}

configs = st.fixed_dictionaries(
    {
        "prediction_type": st.sampled_from(["epsilon", "v_prediction"]),
        "beta_schedule": st.sampled_from(["scaled_linear", "linear", "squaredcos_cap_v2"]),
        "set_alpha_to_one": st.booleans(),
        "steps_offset": st.sampled_from([0, 1]),
        "timestep_spacing": st.sampled_from(["leading", "trailing"]),
    }
)
step_counts = st.sampled_from([1, 2, 7, 10, 25, 50])


def _config(overrides):
    return {**SD_CONFIG, **overrides}


@settings(max_examples=30, deadline=None, derandomize=True)
@given(overrides=configs, num_steps=step_counts, seed=st.integers(0, 2**16))
def test_ddim_step_equals_diffusers(overrides, num_steps, seed):
    config = _config(overrides)
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(num_steps)
    schedule = Schedule.from_config(scheduler.config)
    grid = ddim_timesteps(schedule, num_steps)
    assert list(grid) == scheduler.timesteps.tolist()
    g = torch.Generator().manual_seed(seed)
    stride = schedule.stride(num_steps)
    for t in grid:
        sample, output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = scheduler.step(output, t, sample, eta=0.0).prev_sample
        ours = ddim_step(output, sample, schedule.level(t), schedule.level(t - stride), schedule.prediction_type)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(overrides=configs, num_steps=step_counts, seed=st.integers(0, 2**16))
def test_ddim_inverse_step_equals_diffusers(overrides, num_steps, seed):
    config = _config(overrides)
    scheduler = DDIMInverseScheduler(**config)
    scheduler.set_timesteps(num_steps)
    schedule = Schedule.from_config(config)
    assert list(ddim_timesteps(schedule, num_steps))[::-1] == scheduler.timesteps.tolist()
    g = torch.Generator().manual_seed(seed)
    stride = schedule.stride(num_steps)
    # DDIMInverseScheduler starts from alphas_cumprod[0] or 1 ("initial_alpha_cumprod")
    # exactly as DDIMScheduler ends, so both sides use Schedule.alpha(t < 0).
    for t in scheduler.timesteps.tolist():
        sample, output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = scheduler.step(output, t, sample).prev_sample
        ours = ddim_inverse_step(
            output, sample, schedule.level(t - stride), schedule.level(t), schedule.prediction_type
        )
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_timestep_grid_linspace_equals_diffusers():
    for n in (1, 3, 10, 50):
        scheduler = DDIMScheduler(**_config({"timestep_spacing": "linspace"}))
        scheduler.set_timesteps(n)
        schedule = Schedule.from_config(scheduler.config)
        assert list(ddim_timesteps(schedule, n)) == scheduler.timesteps.tolist()


def _exact_model(schedule: Schedule, eps: torch.Tensor):
    """A model whose noise prediction is ``eps`` whatever x is."""
    assert schedule.prediction_type == "epsilon"
    return lambda x, t, cond: eps.expand_as(x)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    spacing=st.sampled_from(["leading", "trailing"]),
    num_steps=st.sampled_from([1, 5, 20, 50]),
    guidance=st.sampled_from([1.0, 7.5]),
    seed=st.integers(0, 2**16),
)
def test_inversion_round_trip_is_exact_for_x_independent_noise(spacing, num_steps, guidance, seed):
    """Invert then denoise returns x_0 when the noise prediction does not depend on x.

    Epsilon parameterisation only: inversion evaluates the model at the target timestep
    (as diffusers and null-text inversion do) while x still sits at the previous one, so a
    v-prediction model cannot express "the same eps whatever x" there. The v
    parameterisation of the step itself is checked against diffusers above.
    """
    schedule = Schedule.from_config(_config({"timestep_spacing": spacing}))
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    model = _exact_model(schedule, torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64))
    cond = Condition(torch.zeros(1, 3, 2, dtype=torch.float64))
    trajectory = ddim_invert(model, DdimGrid.build(schedule, num_steps), x0, cond, uncond=cond, guidance=guidance)
    assert len(trajectory) == num_steps + 1
    back = ddim_sample(model, DdimGrid.build(schedule, num_steps), trajectory[-1], cond, uncond=cond, guidance=guidance)
    torch.testing.assert_close(back, x0, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(shift=st.sampled_from([1.0, 3.0]), num_steps=step_counts, seed=st.integers(0, 2**16))
def test_the_flow_step_equals_diffusers_flow_match_euler(shift, num_steps, seed):
    """One DDIM kernel pair, the rectified-flow family: the grid and the step equal FlowMatchEulerDiscreteScheduler."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps)
    schedule = Schedule.from_config(scheduler.config)
    grid = DdimGrid.build(schedule, num_steps)
    assert list(grid.timesteps) == scheduler.timesteps.tolist()
    assert [step.level.sigma for step in grid.steps] + [grid.steps[-1].level_prev.sigma] == scheduler.sigmas.tolist()
    g = torch.Generator().manual_seed(seed)
    for step in grid.steps:
        sample, output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = scheduler.step(output, step.t, sample).prev_sample
        torch.testing.assert_close(ddim_step(output, sample, step.level, step.level_prev, "flow"), expected,
                                   rtol=1e-6, atol=1e-6)
        on = step.on("cpu")  # as a captured graph takes the step
        torch.testing.assert_close(ddim_step(output, sample, on.level, on.level_prev, "flow"), expected,
                                   rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(shift=st.sampled_from([1.0, 3.0]), num_steps=st.sampled_from([1, 5, 20, 50]),
       guidance=st.sampled_from([1.0, 7.5]), seed=st.integers(0, 2**16))
def test_flow_inversion_round_trip_is_exact_for_a_straight_flow(shift, num_steps, guidance, seed):
    """A flow whose velocity does not depend on x (one straight path) is integrated exactly by Euler: invert then
    denoise returns x_0, and inversion lands on x_0 + v (the noise end of the path)."""
    schedule = Schedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": shift})
    g = torch.Generator().manual_seed(seed)
    x0, v = (torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    cond = Condition(torch.zeros(1, 3, 2, dtype=torch.float64))

    def model(x, t, c):
        return v.expand_as(x)

    grid = DdimGrid.build(schedule, num_steps)
    trajectory = ddim_invert(model, grid, x0, cond, uncond=cond, guidance=guidance)
    torch.testing.assert_close(trajectory[-1], x0 + v, rtol=1e-6, atol=1e-6)
    back = ddim_sample(model, grid, trajectory[-1], cond, uncond=cond, guidance=guidance)
    torch.testing.assert_close(back, x0, rtol=1e-6, atol=1e-6)


def test_the_flow_training_target_is_the_velocity_of_its_noising():
    schedule = Schedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ts = schedule.training_timesteps()[torch.tensor([0, 500, 999])]
    alpha, sigma = schedule.levels(ts)
    x_t = add_noise(x0, eps, (alpha.float(), sigma.float()))
    v = training_target(x0, eps, (alpha, sigma), "flow")
    torch.testing.assert_close(v, eps - x0)
    per_sample = Level(alpha.float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1))
    x0_hat, eps_hat = predict_x0_and_eps(v, x_t, per_sample, "flow")
    torch.testing.assert_close(x0_hat, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-5, atol=1e-5)
    assert float(sigma[0]) == 1.0 and float(alpha[0]) == 0.0  # the first training timestep is pure noise


def test_inversion_round_trip_error_shrinks_with_more_steps(tiny):
    """A random UNet's noise depends on x, so the round trip is approximate; more steps, less error.

    Measured on the tiny backend (seed 0): RMS error 0.67, 0.73, 0.54, 0.34, 0.19, 0.095
    for 5, 10, 25, 50, 100, 200 steps: first-order convergence once the steps are small.
    """
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    cond = tiny.encode_text(["a photo of a dog"])
    errors = {}
    with torch.no_grad():
        for n in (25, 50, 100):
            traj = ddim_invert(tiny.denoise, DdimGrid.build(tiny.schedule, n), x0, cond)
            back = ddim_sample(tiny.denoise, DdimGrid.build(tiny.schedule, n), traj[-1], cond, guidance=1.0)
            errors[n] = (back - x0).pow(2).mean().sqrt().item()
    print("tiny UNet DDIM round-trip RMS error by step count:", errors)
    assert errors[100] < errors[50] < errors[25]
    assert errors[100] < 0.6 * errors[25]


def test_cfg_combine_is_the_papers_convention():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert cfg_combine(cond, uncond, 1.0).item() == 3.0
    assert cfg_combine(cond, uncond, 0.0).item() == 1.0
    assert cfg_combine(cond, uncond, 7.5).item() == pytest.approx(7.5 * 3 - 6.5 * 1)


def test_v_prediction_and_epsilon_agree_on_the_same_model():
    """A v output converted to eps gives the step an eps model with that eps would give."""
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    a, a_prev = 0.3, 0.6
    level, level_prev = (Level(math.sqrt(v), math.sqrt(1 - v)) for v in (a, a_prev))
    v = (eps - math.sqrt(1 - a) * x) / math.sqrt(a)
    x0_v, eps_v = predict_x0_and_eps(v, x, level, "v_prediction")
    torch.testing.assert_close(eps_v, eps)
    torch.testing.assert_close(
        ddim_step(v, x, level, level_prev, "v_prediction"), ddim_step(eps, x, level, level_prev, "epsilon")
    )


def test_kernels_are_differentiable():
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    out = torch.randn(1, 4, 8, 8, requires_grad=True)
    low, high = Level(math.sqrt(0.3), math.sqrt(0.7)), Level(math.sqrt(0.6), math.sqrt(0.4))
    (ddim_step(out, x, low, high) + ddim_inverse_step(out, x, high, low)).sum().backward()
    assert x.grad is not None and out.grad is not None
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_schedule_rejects_unknown_settings():
    with pytest.raises(ValueError, match="prediction_type"):
        Schedule.from_config({"prediction_type": "sample"})
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(Schedule.from_config(SD_CONFIG), 0)
