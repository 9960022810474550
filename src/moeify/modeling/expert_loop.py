"""Per-expert loop over contiguous token groups, forward and backward written out.

Autograd through `unbind` would stack the per-expert weight gradients into the fused gradient
(a full extra copy, E/k times the size of a dense layer's gradient); here every expert's weight
gradient is written in place into one preallocated [E, ...] tensor.
"""

import torch
import torch.nn.functional as F


class ExpertLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AD: torch.Tensor, gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor, counts: list[int]) -> torch.Tensor:
        y_AD = x_AD.new_empty(x_AD.shape[0], down_EDF.shape[1])
        saved = []
        start = 0
        for e, count in enumerate(counts):
            if count:
                x_CD = x_AD[start : start + count]
                h_CF2 = x_CD @ gate_up_EFD[e].t()
                gate_CF, up_CF = h_CF2.chunk(2, dim=-1)
                torch.mm(F.silu(gate_CF) * up_CF, down_EDF[e].t(), out=y_AD[start : start + count])
                saved.append(h_CF2)
            start += count
        ctx.counts = counts
        ctx.save_for_backward(x_AD, gate_up_EFD, down_EDF, *saved)
        return y_AD

    @staticmethod
    def backward(ctx, grad_AD: torch.Tensor):
        x_AD, gate_up_EFD, down_EDF, *saved = ctx.saved_tensors
        grad_AD = grad_AD.contiguous()
        grad_x = torch.empty_like(x_AD) if ctx.needs_input_grad[0] else None
        grad_gate_up = torch.zeros_like(gate_up_EFD) if ctx.needs_input_grad[1] else None
        grad_down = torch.zeros_like(down_EDF) if ctx.needs_input_grad[2] else None
        start, i = 0, 0
        for e, count in enumerate(ctx.counts):
            if not count:
                continue
            h_CF2 = saved[i]
            i += 1
            gate_CF, up_CF = h_CF2.chunk(2, dim=-1)
            silu_CF = F.silu(gate_CF)
            act_CF = silu_CF * up_CF
            g_CD = grad_AD[start : start + count]
            if grad_down is not None:
                torch.mm(g_CD.t(), act_CF, out=grad_down[e])
            g_act_CF = g_CD @ down_EDF[e]
            sig_CF = torch.sigmoid(gate_CF)
            # d silu(g)/dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
            g_h_CF2 = torch.cat([g_act_CF * up_CF * sig_CF * (1 + gate_CF * (1 - sig_CF)), g_act_CF * silu_CF], dim=-1)
            if grad_gate_up is not None:
                torch.mm(g_h_CF2.t(), x_AD[start : start + count], out=grad_gate_up[e])
            if grad_x is not None:
                torch.mm(g_h_CF2, gate_up_EFD[e], out=grad_x[start : start + count])
            start += count
        return grad_x, grad_gate_up, grad_down, None
