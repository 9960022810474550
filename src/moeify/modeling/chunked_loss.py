"""Training cross-entropy without the micro-batch's logits in memory.

The output projection is replaced by ChunkedLMHead (same weight, same state-dict name). When
`targets` is set it returns each position's next-token NLL instead of logits: `chunk` positions at
a time, each chunk's [chunk, V] logits computed under checkpointing, so they are recomputed in the
backward instead of kept (for V = 128k and 8k tokens that is 4 GB of fp32 logits not held).
Evaluation (targets unset) gets ordinary logits. The loss is computed inside the model's forward,
so FSDP2 has the (root-sharded) head weight gathered whenever it is used.

With `distill` set too (a teacher's final hidden states and output projection), the head returns per
position the distillation objective (1 - alpha) NLL + alpha tau^2 KL(teacher || student at tau) and,
without gradient, the NLL, the KL and the teacher's NLL. Its gradient is computed in the forward, chunk
by chunk, from the closed form d/dlogits = (1 - alpha) (softmax(s) - onehot) + alpha tau (softmax(s/tau)
- softmax(t/tau)): neither model's logits are kept or recomputed, four [chunk, V] fp32 buffers at a time.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class DistillTargets:
    hidden_BSD: torch.Tensor  # the teacher's final (normed) hidden states, no gradient
    head_VD: torch.Tensor  # the teacher's output projection
    alpha: float
    temperature: float


def _chunk_nll(hidden_CD: torch.Tensor, weight_VD: torch.Tensor, targets_C: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden_CD, weight_VD).float(), targets_C, reduction="none")


class FusedDistillation(torch.autograd.Function):
    """[N, 4] per position: objective (with gradient), the student's NLL, KL(teacher || student) at tau, the
    teacher's NLL (the last three without). The gradient is exact for any weighting of the objective over
    positions for the hidden states, and for equal weights (a mean, what training takes) for the weight."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, teacher_ND, teacher_VD, alpha: float, tau: float, chunk: int):
        N = hidden_ND.shape[0]
        out_N4 = torch.empty(N, 4, dtype=torch.float32, device=hidden_ND.device)
        grad_hidden_ND = torch.empty_like(hidden_ND)
        grad_weight_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device)
        rows = torch.arange(min(chunk, N), device=hidden_ND.device)
        for i in range(0, N, chunk):
            h_CD, y_C = hidden_ND[i : i + chunk], targets_N[i : i + chunk]
            C = h_CD.shape[0]
            # In place wherever possible: each pass over a [C, V] buffer costs as much as a small matmul.
            s_CV = F.linear(h_CD, weight_VD).float()
            t_CV = F.linear(teacher_ND[i : i + chunk], teacher_VD).float()
            s_lse_C1, t_lse_C1 = torch.logsumexp(s_CV, dim=1, keepdim=True), torch.logsumexp(t_CV, dim=1, keepdim=True)
            nll_C = s_lse_C1[:, 0] - s_CV[rows[:C], y_C]
            teacher_nll_C = t_lse_C1[:, 0] - t_CV[rows[:C], y_C]
            softmax_CV = None if tau == 1 else torch.softmax(s_CV, dim=1)  # at tau = 1 it is q, below
            if tau != 1:
                s_lse_C1, t_lse_C1 = torch.logsumexp(s_CV.div_(tau), dim=1, keepdim=True), torch.logsumexp(t_CV.div_(tau), dim=1, keepdim=True)
            log_q_CV, log_p_CV = s_CV.sub_(s_lse_C1), t_CV.sub_(t_lse_C1)
            p_CV = log_p_CV.exp()
            kl_C = (p_CV.unsqueeze(1) @ log_p_CV.sub_(log_q_CV).unsqueeze(2)).view(C)  # sum p (log p - log q)
            q_CV = log_q_CV.exp_()
            # d objective / d logits = (1 - alpha) (softmax(s) - onehot) + alpha tau (q - p)
            if softmax_CV is None:
                grad_CV = q_CV.sub_(p_CV, alpha=alpha)
            else:
                grad_CV = softmax_CV.mul_(1 - alpha).add_(q_CV.sub_(p_CV), alpha=alpha * tau)
            grad_CV[rows[:C], y_C] -= 1 - alpha
            grad_hidden_ND[i : i + chunk] = (grad_CV @ weight_VD).to(hidden_ND.dtype)
            grad_weight_VD += (grad_CV.t() @ h_CD).float()
            out_N4[i : i + chunk] = torch.stack([(1 - alpha) * nll_C + alpha * tau**2 * kl_C, nll_C, kl_C, teacher_nll_C], dim=1)
        ctx.weight_dtype = weight_VD.dtype
        ctx.save_for_backward(grad_hidden_ND, grad_weight_VD)
        return out_N4

    @staticmethod
    def backward(ctx, grad_N4):
        grad_hidden_ND, grad_weight_VD = ctx.saved_tensors
        g_N = grad_N4[:, 0]
        grad_hidden = grad_hidden_ND * g_N.unsqueeze(1).to(grad_hidden_ND.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_weight_VD * g_N.mean()).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


class ChunkedLMHead(nn.Module):
    def __init__(self, head: nn.Linear, chunk: int):
        super().__init__()
        assert head.bias is None, "moeify's families have no output bias"
        self.weight = head.weight
        self.in_features, self.out_features = head.in_features, head.out_features
        self.chunk = chunk
        self.targets: torch.Tensor | None = None  # [B, S] next-token ids; set by the training loss
        self.distill: DistillTargets | None = None  # set by the distillation loss

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        """Logits; with targets, the NLL per position [B, S]; with distill too, [B, S, 4] (see FusedDistillation)."""
        if self.targets is None:
            return F.linear(hidden_BSD, self.weight)
        B, S, D = hidden_BSD.shape
        hidden_ND, targets_N = hidden_BSD.reshape(-1, D), self.targets.reshape(-1)
        chunk = self.chunk or hidden_ND.shape[0]
        if self.distill is None:
            pieces = [checkpoint(_chunk_nll, hidden_ND[i : i + chunk], self.weight, targets_N[i : i + chunk], use_reentrant=False)
                      for i in range(0, hidden_ND.shape[0], chunk)]
            # A tensor of its own (B x S floats), not a view: FSDP2 warns when the root module returns a view.
            return torch.cat(pieces).view(B, S).clone()
        distill = self.distill
        return FusedDistillation.apply(hidden_ND, self.weight, targets_N, distill.hidden_BSD.reshape(B * S, -1), distill.head_VD,
                                       distill.alpha, distill.temperature, chunk).view(B, S, 4)


def install_chunked_loss(model: nn.Module, chunk: int, always: bool = False) -> None:
    """Replace the model's output projection by a ChunkedLMHead (a no-op for chunk 0 unless `always`:
    distillation's loss lives in the head; chunk 0 is then one chunk of the whole micro-batch)."""
    if (chunk > 0 or always) and not isinstance(model.lm_head, ChunkedLMHead):
        model.lm_head = ChunkedLMHead(model.lm_head, chunk)


def chunked_head(model: nn.Module) -> ChunkedLMHead | None:
    head = getattr(getattr(model, "module", model), "lm_head", None)  # DDP wraps the model in .module
    return head if isinstance(head, ChunkedLMHead) else None
