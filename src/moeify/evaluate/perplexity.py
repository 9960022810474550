import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TextScores:
    perplexity: float
    mean_nll: float
    tokens: int
    logits: torch.Tensor  # [blocks, block_size, vocab], kept for logit comparisons


def blocks_of(token_ids: list[int], block_size: int, max_tokens: int) -> torch.Tensor:
    """The first max_tokens tokens cut into full blocks [N, block_size]."""
    usable = min(len(token_ids), max_tokens) // block_size * block_size
    if usable == 0:
        raise ValueError(f"need at least {block_size} tokens of text, got {len(token_ids)}")
    return torch.tensor(token_ids[:usable]).view(-1, block_size)


@torch.no_grad()
def score_blocks(model: torch.nn.Module, blocks_NS: torch.Tensor, batch_size: int = 1) -> TextScores:
    """Next-token negative log-likelihood of every block, each block scored independently."""
    total_nll, count, all_logits = 0.0, 0, []
    for start in range(0, blocks_NS.shape[0], batch_size):
        ids_BS = blocks_NS[start : start + batch_size]
        logits_BSV = model(input_ids=ids_BS).logits.float()
        nll = F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1), ids_BS[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        count += ids_BS[:, 1:].numel()
        all_logits.append(logits_BSV)
    mean = total_nll / count
    return TextScores(math.exp(mean), mean, count, torch.cat(all_logits))
