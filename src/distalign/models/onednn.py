"""`F.linear` on oneDNN for fp32 CPU inputs of a fixed shape (the decode step's matmuls).

Why (PERFORMANCE.md): on the AMD CPUs this project is measured on, torch's fp32 `mm` runs MKL's sgemm,
which takes a generic code path on non-Intel processors; oneDNN's JIT kernels use the AVX-512 units.
Measured interleaved, 32 x 256 @ 256 x 688 (a decode step of the tiny model): 59 -> 98 GFLOP/s.

Only where shapes repeat: oneDNN builds (JIT-compiles) and caches one primitive per input shape, about
3 ms and 1 MB each here. A decode loop calls the same few shapes hundreds of times (rows x hidden, fixed
for a rollout); a training step sees a new token count almost every batch, where the compile cost eats
the gain and the cache grows without bound, so training keeps `F.linear`. No autograd: callers run
under no_grad. Anything not fp32 on CPU, or a torch without oneDNN, runs `F.linear` unchanged: that
includes bf16 (bf16 weights, or an fp32 input under CPU autocast), where torch's own CPU matmul is
oneDNN's already (AMX where the CPU has it), so a bf16 decode step gains nothing from a direct call.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def onednn_available() -> bool:
    """oneDNN is built in and its linear op runs here (checked once on a tiny input)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w)))
    except (RuntimeError, NotImplementedError):
        return False


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight^T + bias, on oneDNN for fp32 CPU tensors outside autograd and CPU autocast."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.numel() == 0
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
            or torch.is_autocast_enabled("cpu") or not onednn_available()):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
