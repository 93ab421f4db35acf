"""The sampler steps compile with fullgraph=True and a whole loop never recompiles.

Each step is compiled once for the module (backend aot_eager: dynamo capture plus AOTAutograd
functionalisation, without inductor's code generation, to stay fast on a CPU)."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from t2i.schedulers import NoiseSchedule, lms, pndm

SCHEDULE = NoiseSchedule.create()
SHAPE = (1, 4, 8, 8)


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    yield {module: torch.compile(module.step, fullgraph=True, backend="aot_eager") for module in (pndm, lms)}
    torch._dynamo.reset()


@pytest.mark.parametrize("module, options", [(pndm, dict(skip_prk_steps=False, steps_offset=1)),
                                             (pndm, dict(skip_prk_steps=True, prediction_type="v_prediction")),
                                             (lms, dict(use_karras_sigmas=True))],
                         ids=["pndm-prk", "pndm-plms-v", "lms-karras"])
def test_fifty_step_loop_compiles_once(compiled, module, options):
    state = module.init(SCHEDULE, 50, shape=SHAPE, **options)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * state.init_noise_sigma
    counters.clear()
    for i, t in enumerate(state.timesteps):
        eps = torch.tanh(module.scale_model_input(state, x))
        if i == 0:  # compiles here (or already did, for an earlier state of the same shapes)
            x, state = compiled[module](state, eps, x)
            graphs_after_first_step = counters["stats"]["unique_graphs"]
            continue
        with torch._dynamo.config.patch(error_on_recompile=True):
            x, state = compiled[module](state, eps, x)
    assert graphs_after_first_step <= 1
    assert counters["stats"]["unique_graphs"] == graphs_after_first_step
    assert not counters["recompiles"]
    assert int(state.step_index) == len(state.timesteps)


def test_compiled_equals_eager(compiled):
    state = lms.init(SCHEDULE, 50, shape=SHAPE)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * state.init_noise_sigma
    compiled_x, compiled_state, eager_x, eager_state = x, state, x, state
    for _ in range(6):
        compiled_x, compiled_state = compiled[lms](compiled_state, torch.tanh(compiled_x), compiled_x)
        eager_x, eager_state = lms.step(eager_state, torch.tanh(eager_x), eager_x)
    torch.testing.assert_close(compiled_x, eager_x, rtol=1e-6, atol=1e-6)
    assert torch.equal(compiled_state.step_index, eager_state.step_index)


@pytest.mark.parametrize("module", [pndm, lms], ids=["pndm", "lms"])
def test_compiled_step_under_autocast_stays_float32(compiled, module):
    """The float32 region (autocast off) compiles into the graph: under bf16 autocast the
    compiled step gives the eager step's float32 result for a bf16 model output."""
    state = module.init(SCHEDULE, 50, shape=SHAPE)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * state.init_noise_sigma
    eager_x, eager_state = x, state
    for _ in range(3):
        eps = torch.tanh(module.scale_model_input(state, x)).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x, state = compiled[module](state, eps, x)
        eager_x, eager_state = module.step(eager_state, eps, eager_x)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, eager_x, rtol=1e-6, atol=1e-6)


def test_compile_sampler_runs_the_loop_without_cuda_graphs():
    """`t2i.sample.compile_sampler` (the bench's compiled+step mode): a stand-in module whose
    compiled step and scaling reproduce the eager loop; its outputs feed the next step directly."""
    from t2i.sample import compile_sampler

    sampler = compile_sampler("lms", backend="aot_eager")
    state = lms.init(SCHEDULE, 8, shape=SHAPE)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * state.init_noise_sigma
    eager_x, eager_state = x, state
    for _ in state.timesteps:
        x, state = sampler.step(state, torch.tanh(sampler.scale_model_input(state, x)), x)
        eager_x, eager_state = lms.step(eager_state, torch.tanh(lms.scale_model_input(eager_state, eager_x)),
                                        eager_x)
    torch.testing.assert_close(x, eager_x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("module", [pndm, lms], ids=["pndm", "lms"])
def test_compiled_step_never_traces_the_autocast_availability_check(monkeypatch, module):
    """torch 2.11's dynamo cannot trace `torch.amp.is_autocast_available` (found on the first
    H200 run: every compiled+step sampling row failed). A stand-in that refuses to be called
    while compiling: the fullgraph step must compile and run without calling it."""
    def untraceable(device_type: str) -> bool:
        if torch.compiler.is_compiling():
            raise RuntimeError("is_autocast_available traced by dynamo")
        return True

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    torch._dynamo.reset()
    step = torch.compile(module.step, fullgraph=True, backend="eager")
    state = module.init(SCHEDULE, 10, shape=SHAPE)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)) * state.init_noise_sigma
    eps = torch.tanh(x)
    compiled_x, _ = step(state, eps, x)
    eager_x, _ = module.step(state, eps, x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled_x, eager_x, rtol=1e-6, atol=1e-6)
