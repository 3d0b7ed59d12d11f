"""fp32 CPU linear layers through oneDNN instead of the BLAS behind `torch.mm`.

    use_onednn_linears(model)          # every plain nn.Linear of `model` (state dict and parameters unchanged)

Why (PERFORMANCE.md): on the AMD CPUs this project is measured on, torch's fp32 `mm` runs MKL's sgemm,
which picks a generic code path on non-Intel processors; oneDNN's JIT kernels use the AVX-512 units.
Measured interleaved on the tiny model's shapes: the forward `x W^T` and the input gradient `g W` are
1.3-1.6x faster (32 x 256 @ 256 x 688: 59 -> 98 GFLOP/s; 1440 x 256 @ 256 x 688: 77 -> 122 GFLOP/s); the
weight gradient `g^T x` is not faster, so it stays on `mm`. Same arithmetic, a different summation
order: results agree with `F.linear` to fp32 rounding (tests), and each kernel is deterministic.

Only fp32 tensors on CPU take this path; everything else (GPU, bf16, fp64, a torch without oneDNN)
runs `F.linear` unchanged, so calling `use_onednn_linears` is always safe.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def _eligible(x: Tensor, weight: Tensor) -> bool:
    """fp32 CPU tensors outside CPU autocast (which would run `F.linear` in bf16)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() > 0 and not torch.is_autocast_enabled("cpu") and onednn_available())


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight^T + bias; x (..., in), weight (out, in) in any strides."""
    return torch.ops.mkldnn._linear_pointwise(x if x.is_contiguous() else x.contiguous(), weight, bias,
                                              "none", [], "")


class _LinearFunction(torch.autograd.Function):
    """y = x W^T + b with the forward and dL/dx on oneDNN, dL/dW = g^T x and dL/db = sum g on torch."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t(), None)
        flat_grad = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = flat_grad.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` with fp32 CPU inputs on oneDNN (forward and input gradient)."""
    if not _eligible(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _LinearFunction.apply(x, weight, bias)
    return _onednn(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """An nn.Linear whose forward is `linear` above; same parameters, state dict and repr."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Switch every plain nn.Linear in `model` to `OneDNNLinear` in place; returns how many.

    No-op (0) where oneDNN is unavailable. Subclasses of nn.Linear (PEFT's LoRA layers, quantised
    layers) keep their class; their inner plain Linears are switched.
    """
    if not onednn_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            count += 1
    return count
