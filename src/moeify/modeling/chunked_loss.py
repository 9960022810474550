"""Training cross-entropy without the micro-batch's logits in memory.

The output projection is replaced by ChunkedLMHead (same weight, same state-dict name). When
`targets` is set it returns each position's next-token NLL instead of logits: `chunk` positions at
a time, each chunk's [chunk, V] logits computed under checkpointing, so they are recomputed in the
backward instead of kept (for V = 128k and 8k tokens that is 4 GB of fp32 logits not held).
Evaluation (targets unset) gets ordinary logits. The loss is computed inside the model's forward,
so FSDP2 has the (root-sharded) head weight gathered whenever it is used.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_nll(hidden_CD: torch.Tensor, weight_VD: torch.Tensor, targets_C: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden_CD, weight_VD).float(), targets_C, reduction="none")


class ChunkedLMHead(nn.Module):
    def __init__(self, head: nn.Linear, chunk: int):
        super().__init__()
        assert head.bias is None, "moeify's families have no output bias"
        self.weight = head.weight
        self.in_features, self.out_features = head.in_features, head.out_features
        self.chunk = chunk
        self.targets: torch.Tensor | None = None  # [B, S] next-token ids; set by the training loss

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return F.linear(hidden_BSD, self.weight)
        B, S, D = hidden_BSD.shape
        hidden_ND, targets_N = hidden_BSD.reshape(-1, D), self.targets.reshape(-1)
        pieces = [checkpoint(_chunk_nll, hidden_ND[i : i + self.chunk], self.weight, targets_N[i : i + self.chunk], use_reentrant=False)
                  for i in range(0, hidden_ND.shape[0], self.chunk)]
        # A tensor of its own (B x S floats), not a view: FSDP2 warns when the root module returns a view.
        return torch.cat(pieces).view(B, S).clone()


def install_chunked_loss(model: nn.Module, chunk: int) -> None:
    """Replace the model's output projection by a ChunkedLMHead (a no-op for chunk 0)."""
    if chunk > 0 and not isinstance(model.lm_head, ChunkedLMHead):
        model.lm_head = ChunkedLMHead(model.lm_head, chunk)


def chunked_head(model: nn.Module) -> ChunkedLMHead | None:
    head = getattr(getattr(model, "module", model), "lm_head", None)  # DDP wraps the model in .module
    return head if isinstance(head, ChunkedLMHead) else None
