"""Grouped GEMM over contiguous row groups: rows offs[e-1]:offs[e] of x are multiplied by w[e].

`torch.nn.functional.grouped_mm` is fast on CPU and GPU, but its CPU backward rejects
non-contiguous incoming gradients, so forward and backward are spelled out here with the
same primitive (both backward products are grouped GEMMs too).
"""

import torch
import torch.nn.functional as F

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """True if the installed torch has grouped_mm and every inner dimension is 16-byte aligned."""
    if _GROUPED_MM is None:
        return False
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and all(w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights)


class _GroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, w_EDF, offs_E)
        return _GROUPED_MM(x_TD, w_EDF, offs=offs_E)

    @staticmethod
    def backward(ctx, grad_TF: torch.Tensor):
        x_TD, w_EDF, offs_E = ctx.saved_tensors
        grad_TF = grad_TF.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _GROUPED_MM(grad_TF, w_EDF.transpose(-2, -1), offs=offs_E)
        if ctx.needs_input_grad[1]:
            # (D, T) x (T, F) with groups along T gives one (D, F) block per expert.
            grad_w = _GROUPED_MM(x_TD.t(), grad_TF, offs=offs_E)
        return grad_x, grad_w, None


def grouped_mm(x_TD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """x_TD rows sorted by group; offs_E the int32 cumulative row counts; returns x_TD @ w_EDF[group]."""
    return _GroupedMatmul.apply(x_TD, w_EDF, offs_E)
