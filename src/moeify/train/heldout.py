"""Held-out loss per domain on a prepared dataset."""

import contextlib

import torch
import torch.nn.functional as F

from moeify.data.packed import PackedDataset


def autocast_for(device: torch.device):
    """bf16 autocast on GPU; plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sequence_losses(model: torch.nn.Module, ids_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, [B]."""
    logits_BSV = model(input_ids=ids_BS).logits
    nll_BS = F.cross_entropy(logits_BSV[:, :-1].float().transpose(1, 2), ids_BS[:, 1:], reduction="none")
    return nll_BS.mean(dim=1)


@torch.no_grad()
def heldout_losses(model: torch.nn.Module, data: PackedDataset, blocks_per_domain: int, batch: int, device: torch.device) -> dict[str, float]:
    """Mean loss on the first `blocks_per_domain` held-out blocks of every domain (same on every rank)."""
    was_training = model.training
    model.eval()
    losses = {}
    for domain in data.domains:
        blocks = data.blocks(domain, "val", blocks_per_domain)
        total = 0.0
        for start in range(0, len(blocks), batch):
            with autocast_for(device):
                total += sequence_losses(model, blocks[start : start + batch].to(device)).sum().item()
        losses[domain] = total / len(blocks)
    model.train(was_training)
    return losses
