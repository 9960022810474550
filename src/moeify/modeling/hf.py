"""Run moeify's MoE block inside a stock transformers model, and map it back to the stock keys.

The stock model keeps its embeddings, attention and norms; each sparse-MoE block (Mixtral,
Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 style) is replaced by a MoEFeedForward holding moeify's MoEBlock
and, where there is one, the shared expert. Its state-dict names are the canonical names
(modeling/canonical.py); the output format maps them to and from the stock model's names.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from moeify.checkpoint.formats import format_of_model_type
from moeify.modeling import canonical as C
from moeify.modeling.canonical import MoELayer
from moeify.modeling.experts import Dispatch
from moeify.modeling.moe_block import MoEBlock, MoEOutput
from moeify.modeling.router import RouterSpec


class SharedExpert(nn.Module):
    """An always-active SwiGLU expert."""

    def __init__(self, hidden_size: int, size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, size, bias=False)
        self.up_proj = nn.Linear(hidden_size, size, bias=False)
        self.down_proj = nn.Linear(size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Drop-in for a stock sparse-MoE block; keeps the last forward's MoEOutput for losses and stats.

    y = MoE(x) + [sigmoid(x w)] * shared(x): Qwen2-MoE gates its shared expert, DeepSeek-V3 does not."""

    def __init__(self, block: MoEBlock, shared_size: int = 0, shared_gated: bool = False):
        super().__init__()
        hidden = block.router.weight.shape[1]
        self.block = block
        self.shared_expert = SharedExpert(hidden, shared_size) if shared_size else None
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared_size and shared_gated else None
        self.last: MoEOutput | None = None

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        self.last = self.block(hidden_BSD)
        y_BSD = self.last.hidden
        if self.shared_expert is not None:
            shared_BSD = self.shared_expert(hidden_BSD)
            if self.shared_expert_gate is not None:
                shared_BSD = torch.sigmoid(self.shared_expert_gate(hidden_BSD)) * shared_BSD
            y_BSD = y_BSD + shared_BSD
        return y_BSD

    @torch.no_grad()
    def load_layer(self, layer: MoELayer) -> None:
        """Copy a layer's canonical tensors in (those this module holds)."""
        tensors = dict(self.named_parameters()) | dict(self.named_buffers())
        for name, tensor in tensors.items():
            if name in layer.module_names() or name == C.NOISE_WEIGHT:
                tensor.copy_(layer.module_tensor(name))


def attach_moe_blocks(
    model: nn.Module, dispatch: Dispatch = "auto", noisy: bool = False, capacity_factor: float | None = None,
    gate: str = "linear", shared: bool | None = None,
) -> list[MoEFeedForward]:
    """Replace every stock sparse-MoE block of `model` in place; returns the new blocks (empty if dense).

    `gate="mlp"` gives each router moeify's MLP gate (its weights are loaded by the caller); `shared`
    says whether the MoE has a shared expert (default: read from the weights, see read_module)."""
    config = model.config
    fmt = format_of_model_type(config.model_type)
    if fmt is None:
        return []
    stock_spec = fmt.router_spec(config)
    spec = RouterSpec(stock_spec.routing, stock_spec.renormalize, gate)
    blocks = []
    for decoder_layer in model.model.layers:
        stock = decoder_layer.mlp
        if not hasattr(stock, "experts"):
            continue
        layer = fmt.read_module(stock, shared)
        E, D = layer.router.shape
        block = MoEBlock(D, layer.experts[0].size, E, config.num_experts_per_tok, dispatch=dispatch, noisy=noisy,
                         capacity_factor=capacity_factor, router_spec=spec)
        shared_size = layer.shared.size if layer.shared is not None else 0
        moe = MoEFeedForward(block, shared_size, layer.shared_gate is not None)
        moe.to(device=layer.router.device, dtype=layer.router.dtype)
        moe.block.router.selection_bias.data = moe.block.router.selection_bias.float()
        moe.load_layer(layer)
        decoder_layer.mlp = moe
        blocks.append(moe)
    return blocks


def moe_layers(model: nn.Module) -> dict[int, MoEFeedForward]:
    """Decoder layer index -> its MoEFeedForward."""
    return {index: layer.mlp for index, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoEFeedForward)}


def stock_state_dict(state: dict[str, torch.Tensor], config, layout: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict of a model with MoEFeedForward blocks (full, unsharded) under the format's on-disk
    keys. An MLP-gated router goes to moeify's own gate keys."""
    fmt = format_of_model_type(config.model_type)
    prefixes = {f"model.layers.{index}.mlp.": index for index in range(config.num_hidden_layers)} if fmt else {}
    out: dict[str, torch.Tensor] = {}
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False) and not (fmt and fmt.explicit_lm_head):
            continue
        prefix = next((p for p in prefixes if name.startswith((p + "block.", p + "shared_expert"))), None)
        if prefix is None:
            out[name] = tensor
        else:
            per_layer.setdefault(prefixes[prefix], {})[name.removeprefix(prefix)] = tensor
    for index, canonical in sorted(per_layer.items()):
        gate = "mlp" if C.ROUTER_MLP_OUT in canonical else "linear"
        out.update(fmt.disk_tensors(index, MoELayer.from_module_state(canonical), gate, layout))
    return out


def expected_disk_shapes(config, gate: str = "linear", layout: str | None = None, shared: bool = False) -> dict[str, tuple[int, ...]]:
    """On-disk key -> shape of every tensor a model of `config` holds (from the stock model built on the meta
    device, so nothing is allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)  # from_config sets config.dtype
        attach_moe_blocks(model, gate=gate, shared=shared)
    return {name: tuple(tensor.shape) for name, tensor in stock_state_dict(model.state_dict(), config, layout).items()}


@torch.no_grad()
def hold_scale_as_multiplier(blocks: list[MoEFeedForward], scale: float) -> None:
    """Take the scale folded into each routed expert's down_proj out of it and apply it to the experts'
    output instead (same function; under AdamW the update of s x W_down is s times larger)."""
    for moe in blocks:
        moe.block.experts.down_proj.div_(scale)
        moe.block.output_scale = scale


def fold_scale(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full state dict with the multiplier folded back into every routed expert's down_proj."""
    suffix = "." + C.DOWN
    return {name: tensor * scale if name.endswith(suffix) else tensor for name, tensor in state.items()}
