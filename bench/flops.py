"""FLOPs and model-FLOP utilisation: counted FLOPs of one real call, the device's dense peaks,
and the samples/s, TFLOP/s and MFU extras of a result row."""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch.utils import flop_counter

from bench.core import BenchContext, tf32_allowed

# Dense peak TFLOP/s by (device-name fragment, dtype), for model-FLOP utilisation. Public spec
# sheets (dense, i.e. half the "with sparsity" figures). "tf32" is the tensor-core peak that fp32
# convolutions and matmuls reach when TF32 is allowed (`fp32_peak_dtype`).
PEAK_TFLOPS: dict[tuple[str, str], float] = {
    ("H200", "bf16"): 989.0, ("H200", "tf32"): 494.5, ("H200", "fp32"): 67.0,
    ("H100", "bf16"): 989.0, ("H100", "tf32"): 494.5, ("H100", "fp32"): 67.0,  # SXM; PCIe is lower
    ("A100", "bf16"): 312.0, ("A100", "tf32"): 156.0, ("A100", "fp32"): 19.5,
    ("L40S", "bf16"): 362.05, ("L40S", "tf32"): 183.0, ("L40S", "fp32"): 91.6,
    ("L40", "bf16"): 181.05, ("L40", "tf32"): 90.5, ("L40", "fp32"): 90.5,
    ("L4", "bf16"): 121.0, ("L4", "tf32"): 60.0, ("L4", "fp32"): 30.3,
    ("A10", "bf16"): 125.0, ("A10", "tf32"): 62.5, ("A10", "fp32"): 31.2,
}


def fp32_peak_dtype(dtype: str, tf32: bool) -> str:
    """The peak an fp32 row is measured against: the TF32 tensor-core peak when TF32 is allowed
    (else its MFU could exceed 100%), the plain fp32 peak otherwise; 16-bit rows unchanged."""
    return "tf32" if dtype == "fp32" and tf32 else dtype


def peak_tflops(ctx: BenchContext, dtype: str | None = None) -> float | None:
    """The device's dense peak for `dtype` (default ctx.dtype; fp32 means TF32 where allowed),
    where known."""
    if ctx.torch_device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(ctx.torch_device)
    return device_peak(name, fp32_peak_dtype(dtype or ctx.dtype, tf32_allowed()))


def device_peak(name: str, dtype: str) -> float | None:
    """PEAK_TFLOPS of the GPU called `name` ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB")
    for `dtype`: a table entry matches one whole word of the name, so "NVIDIA L40S" is not an
    L4 nor "NVIDIA RTX A1000" an A100. None for a GPU the table does not hold."""
    words = set(re.split(r"[^A-Za-z0-9]+", name.upper()))
    return next((peak for (model, peak_dtype), peak in PEAK_TFLOPS.items()
                 if model in words and peak_dtype == dtype), None)


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel (torch 2.11-2.14):
# without these, attention would count as zero on CPU and FLOPs would depend on the device.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                 _cpu_sdpa_backward_flops}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one real call of `fn()` (forward and backward when it back-propagates), counted
    by torch.utils.flop_counter.FlopCounterMode: 2 per multiply-add of matmuls, convolutions and
    attention; norms, pointwise ops and the optimizer are not counted."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    with counter:
        fn()
    return counter.get_total_flops()


def throughput(stats: dict[str, Any], *, ctx: BenchContext, samples: int,
               flops_per_sample: float | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Extras for a model row: samples/s, and with a FLOP count, achieved TFLOP/s and MFU
    (against the peak for `dtype`, default ctx.dtype)."""
    out: dict[str, Any] = {"samples_per_s": samples / stats["median_s"]}
    if flops_per_sample:
        achieved = flops_per_sample * samples / stats["median_s"] / 1e12
        out.update(flops_per_sample=flops_per_sample, tflops=achieved)
        peak = peak_tflops(ctx, dtype)
        if peak:
            out["mfu"] = achieved / peak
            out["mfu_peak"] = fp32_peak_dtype(dtype or ctx.dtype, tf32_allowed())
    return out
