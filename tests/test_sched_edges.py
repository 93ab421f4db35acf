"""Sampler edges and the CUDA-facing properties of a step, on the CPU.

- The step counts t2i-sample accepts (1..T) all work, and the first model call of a fresh run
  is at the noisiest timestep T - 1 (`t2i.sample.sampler_state`), for PNDM and LMS; expected
  grids and one-step results are derived here in float64 from the formulas.
- `step` and `scale_model_input` run in float32 with autocast off, even under a policy that
  would downcast their arithmetic (CUDA autocast puts torch.mv on its bf16 list; the CPU's does
  not, so a probe stands in for it).
- No host sync: on the meta device a `.item()` would fail; a dispatch mode sees every aten op.
- Plans are validated once, on the host, in `init`; a step past the end reads a NaN row.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from t2i.sample import sampler_state
from t2i.schedulers import NoiseSchedule, lms, pndm
from t2i.schedulers._common import check_plan, table_row

T = 1000
SCHEDULE = NoiseSchedule.create(T, 0.00085, 0.012, "scaled_linear")
ALPHA_BAR = SCHEDULE.alphas_cumprod.tolist()
SIGMA = [math.sqrt((1 - a) / a) for a in ALPHA_BAR]
MODULES = {"pndm": pndm, "lms": lms}


def trailing(n):
    """round(T - k T / n) - 1, k = 0..n-1, from the option's definition."""
    return [round(T - k * T / n) - 1 for k in range(n)]


def plms_calls(grid):
    """PLMS redoes the first interval: [g0, g1, g1, g2, ...]; one step is one call."""
    return grid[:1] + [grid[1]] + grid[1:] if len(grid) > 1 else grid


# ----------------------------------------------------------------------------------------------
# The documented range of steps, and where a run starts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3, 50, 999, 1000])
def test_pndm_sampling_grid_starts_at_the_noisiest_timestep(steps):
    state = sampler_state(SCHEDULE, "pndm", steps, 1.0, (1,))
    assert state.timesteps.tolist() == plms_calls(trailing(steps))
    assert int(state.timesteps[0]) == T - 1


def test_pndm_sampling_grid_edges_written_out():
    assert sampler_state(SCHEDULE, "pndm", 1, 1.0, (1,)).timesteps.tolist() == [999]
    assert sampler_state(SCHEDULE, "pndm", 2, 1.0, (1,)).timesteps.tolist() == [999, 499, 499]
    calls = sampler_state(SCHEDULE, "pndm", 1000, 1.0, (1,)).timesteps.tolist()
    assert calls == [999, 998] + list(range(998, -1, -1))  # every training timestep, 1001 calls


@pytest.mark.parametrize("steps", [1, 2, 3, 50, 999, 1000])
def test_lms_sampling_grid_starts_at_the_noisiest_timestep(steps):
    state = sampler_state(SCHEDULE, "lms", steps, 1.0, (1,))
    expected = [999.0] if steps == 1 else [k * (T - 1) / (steps - 1) for k in reversed(range(steps))]
    assert state.timesteps.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-4)
    assert state.timesteps[0].item() == T - 1
    assert state.sigmas[0].item() == pytest.approx(SIGMA[-1], rel=1e-12)  # sigma_max
    assert state.init_noise_sigma == pytest.approx(SIGMA[-1], rel=1e-12)


def test_lms_sampling_grid_edges_written_out():
    one = sampler_state(SCHEDULE, "lms", 1, 1.0, (1,))
    assert one.timesteps.tolist() == [999.0]
    assert one.sigmas.tolist() == pytest.approx([SIGMA[999], 0.0], rel=1e-12)
    two = sampler_state(SCHEDULE, "lms", 2, 1.0, (1,))
    assert two.timesteps.tolist() == [999.0, 0.0]
    assert two.sigmas.tolist() == pytest.approx([SIGMA[999], SIGMA[0], 0.0], rel=1e-12)
    full = sampler_state(SCHEDULE, "lms", 1000, 1.0, (1,))
    assert full.timesteps.tolist() == [float(t) for t in range(999, -1, -1)]


def test_one_step_pndm_is_the_eq_11_transfer_from_999_to_alpha_bar_0():
    state = sampler_state(SCHEDULE, "pndm", 1, 1.0, (3,))
    x = torch.tensor([1.0, -2.0, 0.5])
    eps = torch.tensor([0.5, 0.25, -1.0])
    out, _ = pndm.step(state, eps, x)
    a, a_next = ALPHA_BAR[999], ALPHA_BAR[0]  # set_alpha_to_one=False: the final alpha_bar is ab_0
    denominator = math.sqrt(a) * (math.sqrt((1 - a_next) * a) + math.sqrt((1 - a) * a_next))
    expected = [math.sqrt(a_next / a) * xi - (a_next - a) / denominator * ei
                for xi, ei in zip(x.tolist(), eps.tolist())]
    assert out.tolist() == pytest.approx(expected, rel=1e-6)


def test_one_step_lms_is_an_euler_step_from_sigma_max_to_zero():
    state = sampler_state(SCHEDULE, "lms", 1, 1.0, (3,))
    x = torch.tensor([3.0, -1.0, 14.0])
    s = SIGMA[999]
    scaled = lms.scale_model_input(state, x)
    assert scaled.tolist() == pytest.approx((x / math.sqrt(s * s + 1)).tolist(), rel=1e-6)
    eps = torch.tensor([0.5, 0.25, -1.0])
    out, _ = lms.step(state, eps, x)
    assert out.tolist() == pytest.approx((x - s * eps).tolist(), rel=1e-6)  # x + (0 - s) d


@pytest.mark.parametrize("name", ["pndm", "lms"])
def test_out_of_range_step_counts_are_a_clear_error(name):
    for steps in (0, T + 1):
        with pytest.raises(ValueError, match="between 1 and num_train_timesteps"):
            sampler_state(SCHEDULE, name, steps, 1.0, (1,))


def test_library_linspace_with_one_step_runs_at_the_noisiest_timestep():
    """Deviation from the reference (linspace(0, T - 1, 1) = [0]): one step denoises from T - 1."""
    assert pndm.init(SCHEDULE, 1, timestep_spacing="linspace", shape=(1,)).timesteps.tolist() == [999]
    assert lms.init(SCHEDULE, 1, shape=(1,)).timesteps.tolist() == [999.0]


# ----------------------------------------------------------------------------------------------
# float32 with autocast off
# ----------------------------------------------------------------------------------------------


def downcasting_mv(seen: list):
    """torch.mv as CUDA autocast would run it (bf16 in, bf16 out) whenever autocast is on; the
    probe records whether it was."""
    original = torch.mv

    def mv(matrix, vector):
        enabled = torch.is_autocast_enabled("cpu")
        seen.append(enabled)
        if enabled:
            return original(matrix.bfloat16(), vector.bfloat16())
        return original(matrix, vector)

    return mv


@pytest.mark.parametrize("name", ["pndm", "lms"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_runs_in_float32_with_autocast_off(monkeypatch, name, prediction_type):
    module = MODULES[name]
    shape = (2, 4, 4, 4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 3
    eps = [torch.randn(shape, generator=gen).bfloat16() for _ in range(4)]  # as a bf16 UNet gives

    def run():
        state = module.init(SCHEDULE, 10, prediction_type=prediction_type, shape=shape)
        out, scaled = x, []
        for e in eps:
            scaled.append(module.scale_model_input(state, out))
            out, state = module.step(state, e, out)
        return out, scaled

    reference, reference_scaled = run()
    seen: list = []
    monkeypatch.setattr(torch, "mv", downcasting_mv(seen))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        under, under_scaled = run()
        assert torch.is_autocast_enabled("cpu")  # restored after each call
    assert seen == [False] * len(eps)
    assert under.dtype == torch.float32 and torch.equal(under, reference)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(under_scaled, reference_scaled))
    # the probe does downcast when autocast is on: the test would see a step that left it on
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mv(torch.ones(2, 3), torch.ones(3)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# No host sync; init-time validation; past the end
# ----------------------------------------------------------------------------------------------


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


SYNC_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item")


@pytest.mark.parametrize("name", ["pndm", "lms"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_and_scaling_never_read_a_device_value(name, prediction_type):
    """On a non-CPU device (meta: no data at all) the eager step with its checks runs without a
    single op that copies a value to the host; `table[step_index]` with a 0-d tensor would."""
    module = MODULES[name]
    shape = (1, 4, 8, 8)
    state = module.init(SCHEDULE, 10, prediction_type=prediction_type, shape=shape, device="meta")
    x = torch.zeros(shape, device="meta")
    with OpLog() as log:
        for _ in range(3):
            x_in = module.scale_model_input(state, x)
            x, state = module.step(state, x_in, x)
    assert log.ops and not [op for op in log.ops if op.startswith(SYNC_OPS)]


def test_indexing_with_a_0d_tensor_is_a_host_sync():
    """Why `table_row` exists: plain indexing with a 0-d index tensor reads it on the host."""
    with OpLog() as log:
        torch.zeros(3, 2)[torch.tensor(1)]
    assert any(op.startswith(SYNC_OPS) for op in log.ops)


def test_past_the_end_reads_a_nan_row_without_a_host_check():
    table = torch.tensor([[1.0, 2.0], [3.0, 4.0], [float("nan")] * 2])
    assert table_row(table, torch.tensor(1)).tolist() == [3.0, 4.0]
    assert table_row(table, torch.tensor(2)).isnan().all()
    assert table_row(table, torch.tensor(7)).isnan().all()  # clamped: never out of bounds
    for module in (pndm, lms):
        state = module.init(SCHEDULE, 5, shape=(1,))
        assert state.coefficients.shape[0] == len(state.timesteps) + 1
        assert state.coefficients[-1].isnan().all()
        assert torch.isfinite(state.coefficients[:-1]).all()


def test_plans_are_checked_once_on_the_host():
    good = np.ones((2, 3))
    check_plan("pndm", np.array([999, 0]), good, T)
    with pytest.raises(ValueError, match="leave"):
        check_plan("pndm", np.array([1000, 0]), good, T)
    with pytest.raises(ValueError, match="leave"):
        check_plan("lms", np.array([5.0, -0.5]), good, T)
    with pytest.raises(ValueError, match="non-finite"):
        check_plan("lms", np.array([5.0, 0.0]), np.array([[1.0, np.inf]]), T)
    with pytest.raises(ValueError, match="no model call"):
        check_plan("pndm", np.array([]), np.zeros((0, 3)), T)


@pytest.mark.parametrize("name", ["pndm", "lms"])
def test_step_takes_its_tensors_by_keyword_too(name):
    module = MODULES[name]
    state = module.init(SCHEDULE, 4, shape=(2,))
    x, eps = torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.25])
    by_position = module.step(state, eps, x)[0]
    by_keyword = module.step(state, model_output=eps, sample=x)[0]
    assert torch.equal(by_position, by_keyword)
    assert torch.equal(module.scale_model_input(state, sample=x), module.scale_model_input(state, x))
