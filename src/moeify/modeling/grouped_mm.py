"""Grouped GEMM over contiguous row groups: rows offs[e-1]:offs[e] of x are multiplied by w[e].

`torch.nn.functional.grouped_mm` (native forward and backward) is used directly. Its CPU backward
rejects non-contiguous incoming gradients; inside Experts the gradients reaching it always come
out of `chunk`/`mul`/`index_select` and are contiguous.
"""

import torch
import torch.nn.functional as F

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """True if the installed torch has grouped_mm and every inner dimension is 16-byte aligned."""
    if _GROUPED_MM is None or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False  # the kernel's dtypes; float64 takes the loop
    if (x.device.type == "cuda" or torch.compiler.is_compiling()) and x.dtype != torch.bfloat16:
        return False  # CUDA's kernel (and the compiler's shape rule) take bf16 only
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and all(w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights)


def grouped_mm(x_TD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """x_TD rows sorted by group; offs_E the int32 cumulative row counts; returns x_TD @ w_EDF[group]."""
    return _GROUPED_MM(x_TD, w_EDF, offs=offs_E)
