"""Training's losses, from the one scorer (evaluate/scoring.py): per sequence for the step, per domain held out."""

import torch

from moeify.data.packed import PackedDataset
from moeify.evaluate.scoring import next_token_nll, score_blocks
from moeify.modeling.chunked_loss import chunked_head


def sequence_losses(model: torch.nn.Module, ids_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, [B] (chunked when the model has a ChunkedLMHead)."""
    head = chunked_head(model)
    if head is None:
        return next_token_nll(model, ids_BS).mean(dim=1)
    head.targets = ids_BS[:, 1:]
    try:
        # The head returns the NLL per position. No KV cache (see scoring.next_token_logits).
        return model(input_ids=ids_BS[:, :-1], use_cache=False).logits.mean(dim=1)
    finally:
        head.targets = None


def heldout_losses(model: torch.nn.Module, data: PackedDataset, blocks_per_domain: int, batch: int,
                   dtype: torch.dtype | None = None) -> dict[str, float]:
    """Loss (nats per token) on the first `blocks_per_domain` held-out blocks of every domain (same on every rank)."""
    return {domain: score_blocks(model, data.blocks(domain, "val", blocks_per_domain), batch, dtype=dtype).loss
            for domain in data.domains}
