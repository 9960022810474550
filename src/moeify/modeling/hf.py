"""Run moeify's MoE block inside a stock transformers model.

The stock model keeps its embeddings, attention and norms; each sparse-MoE block (Mixtral,
Qwen2-MoE, Qwen3-MoE) is replaced by a MoEFeedForward holding moeify's MoEBlock with the same
weights (and the stock shared expert, where there is one). `stock_state_dict` maps back to the
canonical on-disk key names.
"""

import torch
from torch import nn

from moeify.checkpoint.formats import ARCHITECTURES, OutputArchitecture
from moeify.errors import MoeifyError
from moeify.modeling.experts import Dispatch
from moeify.modeling.moe_block import MoEBlock, MoEOutput

_ARCH_BY_MODEL_TYPE = {arch.config_class.model_type: arch for arch in ARCHITECTURES}


class MoEFeedForward(nn.Module):
    """Drop-in for a stock sparse-MoE block; keeps the last forward's MoEOutput for losses and stats."""

    def __init__(self, block: MoEBlock, shared_expert: nn.Module | None = None, shared_expert_gate: nn.Module | None = None):
        super().__init__()
        self.block = block
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.last: MoEOutput | None = None

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        self.last = self.block(hidden_BSD)
        y_BSD = self.last.hidden
        if self.shared_expert is not None:
            y_BSD = y_BSD + torch.sigmoid(self.shared_expert_gate(hidden_BSD)) * self.shared_expert(hidden_BSD)
        return y_BSD


def output_architecture_of(config) -> OutputArchitecture | None:
    """The export class for an MoE model type, or None for a dense model."""
    return _ARCH_BY_MODEL_TYPE.get(config.model_type)


def attach_moe_blocks(
    model: nn.Module, dispatch: Dispatch = "auto", noisy: bool = False, capacity_factor: float | None = None
) -> list[MoEFeedForward]:
    """Replace every stock sparse-MoE block of `model` in place; returns the new blocks (empty if dense)."""
    config = model.config
    if output_architecture_of(config) is None:
        return []
    if getattr(config, "norm_topk_prob", True) is False:
        raise MoeifyError("this model routes softmax-then-top-k without renormalisation; moeify trains top-k-then-softmax only")
    top_k = config.num_experts_per_tok
    blocks = []
    for layer in model.model.layers:
        stock = layer.mlp
        if not hasattr(stock, "experts"):
            continue
        E, two_F, D = stock.experts.gate_up_proj.shape
        block = MoEBlock(D, two_F // 2, E, top_k, dispatch=dispatch, noisy=noisy, capacity_factor=capacity_factor)
        block.to(device=stock.experts.gate_up_proj.device, dtype=stock.experts.gate_up_proj.dtype)
        with torch.no_grad():
            block.router.weight.copy_(stock.gate.weight)
            block.experts.gate_up_proj.copy_(stock.experts.gate_up_proj)
            block.experts.down_proj.copy_(stock.experts.down_proj)
        shared = getattr(stock, "shared_expert", None)
        has_shared = shared is not None and shared.gate_proj.weight.shape[0] > 0
        layer.mlp = MoEFeedForward(block, shared if has_shared else None, stock.shared_expert_gate if has_shared else None)
        blocks.append(layer.mlp)
    return blocks


def stock_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Map a state dict of a model with MoEFeedForward blocks to the canonical on-disk keys."""
    arch = output_architecture_of(config)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        if ".mlp.block." not in name:
            out[name] = tensor
            continue
        assert arch is not None, f"MoE tensor {name} in a dense model"
        layer = int(name.split(".")[2])
        leaf = name.split(".mlp.block.")[1]
        if leaf == "router.weight":
            out[arch.router_key(layer)] = tensor
        elif leaf == "router.noise_weight":
            continue  # training-only noise scale; inference uses the clean logits
        elif leaf == "router.selection_bias":
            if tensor.abs().max() > 0:
                raise MoeifyError(
                    f"{arch.architecture} cannot hold the aux-loss-free selection bias; "
                    "export this model as DeepSeek-V3 style (not yet supported) or train without --bias-update-rate"
                )
        elif leaf == "experts.gate_up_proj":
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                gate_key, up_key, _ = arch.expert_keys(layer, e)
                out[gate_key], out[up_key] = tensor[e, :half].contiguous(), tensor[e, half:].contiguous()
        elif leaf == "experts.down_proj":
            for e in range(tensor.shape[0]):
                out[arch.expert_keys(layer, e)[2]] = tensor[e].contiguous()
        else:
            raise AssertionError(f"unmapped MoE tensor {name}")
    if arch is not None:
        for layer in range(config.num_hidden_layers):
            for key, tensor in arch.extra_layer_tensors(layer, config.hidden_size, next(iter(out.values())).dtype).items():
                out.setdefault(key, tensor)
    return out
