"""Run moeify's MoE block inside a stock transformers model.

The stock model keeps its embeddings, attention and norms; each sparse-MoE block (Mixtral,
Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 style) is replaced by a MoEFeedForward holding moeify's MoEBlock
with the same weights (and the stock shared expert, where there is one). `stock_state_dict` maps
back to the canonical on-disk key names.
"""

import torch
from torch import nn

from moeify.checkpoint.formats import ARCHITECTURES, OutputArchitecture
from moeify.errors import MoeifyError
from moeify.modeling.experts import Dispatch
from moeify.modeling.moe_block import MoEBlock, MoEOutput
from moeify.modeling.router import RouterSpec

_ARCH_BY_MODEL_TYPE = {arch.config_class.model_type: arch for arch in ARCHITECTURES}


class MoEFeedForward(nn.Module):
    """Drop-in for a stock sparse-MoE block; keeps the last forward's MoEOutput for losses and stats.

    The shared expert (if any) keeps its stock module name, so state-dict keys stay canonical;
    Qwen2-MoE gates it by a sigmoid, DeepSeek-V3 adds it ungated."""

    def __init__(self, block: MoEBlock, shared_name: str | None = None, shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None):
        super().__init__()
        self.block = block
        self.shared_name = shared_name
        if shared_name is not None:
            self.add_module(shared_name, shared_expert)
        self.shared_expert_gate = shared_expert_gate
        self.last: MoEOutput | None = None

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        self.last = self.block(hidden_BSD)
        y_BSD = self.last.hidden
        if self.shared_name is not None:
            shared_BSD = getattr(self, self.shared_name)(hidden_BSD)
            if self.shared_expert_gate is not None:
                shared_BSD = torch.sigmoid(self.shared_expert_gate(hidden_BSD)) * shared_BSD
            y_BSD = y_BSD + shared_BSD
        return y_BSD


def output_architecture_of(config) -> OutputArchitecture | None:
    """The export class for an MoE model type, or None for a dense model."""
    return _ARCH_BY_MODEL_TYPE.get(config.model_type)


def attach_moe_blocks(
    model: nn.Module, dispatch: Dispatch = "auto", noisy: bool = False, capacity_factor: float | None = None,
    gate: str = "linear",
) -> list[MoEFeedForward]:
    """Replace every stock sparse-MoE block of `model` in place; returns the new blocks (empty if dense).

    `gate="mlp"` gives each router moeify's MLP gate (its weights are loaded by the caller)."""
    config = model.config
    arch = output_architecture_of(config)
    if arch is None:
        return []
    stock_spec = arch.router_spec(config)
    spec = RouterSpec(stock_spec.routing, stock_spec.renormalize, gate)
    top_k = config.num_experts_per_tok
    blocks = []
    for layer in model.model.layers:
        stock = layer.mlp
        if not hasattr(stock, "experts"):
            continue
        E, two_F, D = stock.experts.gate_up_proj.shape
        block = MoEBlock(D, two_F // 2, E, top_k, dispatch=dispatch, noisy=noisy, capacity_factor=capacity_factor, router_spec=spec)
        block.to(device=stock.experts.gate_up_proj.device, dtype=stock.experts.gate_up_proj.dtype)
        with torch.no_grad():
            block.router.weight.copy_(stock.gate.weight)
            if hasattr(stock.gate, "e_score_correction_bias"):
                block.router.selection_bias.copy_(stock.gate.e_score_correction_bias)
            block.experts.gate_up_proj.copy_(stock.experts.gate_up_proj)
            block.experts.down_proj.copy_(stock.experts.down_proj)
        shared_name = arch.shared_attribute
        shared = getattr(stock, shared_name, None) if shared_name else None
        if shared is None or shared.gate_proj.weight.shape[0] == 0:
            shared_name = shared = None
        layer.mlp = MoEFeedForward(block, shared_name, shared, getattr(stock, "shared_expert_gate", None) if shared_name else None)
        blocks.append(layer.mlp)
    return blocks


def stock_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Map a state dict of a model with MoEFeedForward blocks to the canonical on-disk keys.

    An MLP-gated router maps to moeify's own gate keys (see checkpoint/formats.py)."""
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
            mlp_gate = f"{name.split('.mlp.block.')[0]}.mlp.block.router.mlp_out" in state
            out[arch.gate_keys(layer, "mlp" if mlp_gate else "linear")[0]] = tensor
        elif leaf == "router.mlp_out":
            out[arch.gate_keys(layer, "mlp")[1]] = tensor
        elif leaf == "router.noise_weight":
            continue  # training-only noise scale; inference uses the clean logits
        elif leaf == "router.selection_bias":
            if arch.selection_bias_key is not None:
                out[arch.selection_bias_key.format(layer=layer)] = tensor.float()
            elif tensor.abs().max() > 0:
                raise MoeifyError(
                    f"{arch.architecture} cannot hold the aux-loss-free selection bias; "
                    "build with --routing sigmoid-topk (DeepSeek-V3 format) or train without --bias-update-rate"
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
        dtype = next(iter(out.values())).dtype
        expert_size = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        num_experts = getattr(config, "num_local_experts", None) or config.num_experts
        for layer in range(config.num_hidden_layers):
            for key, tensor in arch.layer_tensors(layer, None, config.hidden_size, expert_size, num_experts, dtype).items():
                out.setdefault(key, tensor)
    return out
