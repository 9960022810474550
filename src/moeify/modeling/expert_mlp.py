"""Rows grouped by expert through their expert's SwiGLU: grouped GEMM or the per-expert loop."""

import torch
import torch.nn.functional as F

from moeify.modeling.expert_loop import ExpertLoop
from moeify.modeling.grouped_mm import grouped_mm


def expert_mlp(x_AD: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts_E: torch.Tensor, use_grouped_mm: bool,
               weight_A1: torch.Tensor | None = None) -> torch.Tensor:
    """counts_E[e] consecutive rows of x_AD for expert e, each through expert e, times weight_A1 if given.

    grouped_mm keeps the counts on the device; the loop takes them to the host. An empty batch
    goes through the loop, whose backward gives zero weight gradients for no rows."""
    if not use_grouped_mm or x_AD.shape[0] == 0:
        y_AD = ExpertLoop.apply(x_AD, gate_up, down, counts_E.tolist())
        return y_AD if weight_A1 is None else y_AD * weight_A1
    offs_E = counts_E.cumsum(0).to(torch.int32)
    gate_AF, up_AF = grouped_mm(x_AD, gate_up.transpose(-2, -1), offs_E).chunk(2, dim=-1)
    act_AF = F.silu(gate_AF) * up_AF
    # The mixing weight scales the activation or the output (same result, being linear): whichever
    # is smaller, A x F for fine-grained experts, A x D for upcycled ones.
    weight_first = weight_A1 is not None and act_AF.shape[1] < down.shape[1]
    if weight_first:
        act_AF = act_AF * weight_A1
    y_AD = grouped_mm(act_AF, down.transpose(-2, -1), offs_E)
    return y_AD if weight_A1 is None or weight_first else y_AD * weight_A1
