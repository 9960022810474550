"""What an output format is: a stock transformers MoE architecture moeify writes and reads.

Each format (one file each, next to this one) declares which dense models and MoE features it holds
exactly (`supports`), derives its config, and maps the canonical tensors of an MoE layer
(modeling/canonical.py) to its on-disk keys and to the module names of the loaded stock model.
"""

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PretrainedConfig

from moeify.errors import MoeifyError
from moeify.modeling import canonical as C
from moeify.modeling.canonical import FFNWeights, MoELayer
from moeify.modeling.router import RouterSpec

# Dense-config fields that describe the MLP, not the attention/embedding skeleton, and are never copied.
_NOT_COPIED = {"architectures", "model_type", "intermediate_size", "transformers_version", "dtype", "torch_dtype"}


@dataclass(frozen=True)
class MoEFeatures:
    """What an MoE needs from an output format besides the dense skeleton."""

    router: RouterSpec = RouterSpec()
    shared_size: int = 0  # neurons of the always-active shared expert (0: none)

    def describe(self) -> str:
        parts = [self.router.routing + ("" if self.router.renormalize else " without renormalisation")]
        if self.shared_size:
            parts.append(f"a shared expert of {self.shared_size} neurons")
        return ", ".join(parts)

    @property
    def softmax_family(self) -> bool:
        return self.router.routing in ("topk-softmax", "softmax-topk")


def print_engine_limits(fmt: "OutputFormat", config: PretrainedConfig, layout: str) -> None:
    for line in fmt.engine_limits(config, layout):
        print(f"moeify: note: {line}", file=sys.stderr)


def _config_fields(config_class: type[PretrainedConfig]) -> set[str]:
    fields: set[str] = set()
    for cls in config_class.__mro__:
        fields.update(getattr(cls, "__annotations__", {}))
    return fields


def head_dim(dense: PretrainedConfig) -> int:
    return getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads


def zero_ffn(hidden_size: int, width: int, dtype: torch.dtype) -> FFNWeights:
    """A feed-forward whose weights are all zero: it adds exactly zero, and training leaves it so (with
    gate, up and down zero every gradient is zero). What a format that always has a shared expert
    holds for an MoE without one; engines need it of non-zero width."""
    return FFNWeights(torch.zeros(width, hidden_size, dtype=dtype), torch.zeros(width, hidden_size, dtype=dtype),
                      torch.zeros(hidden_size, width, dtype=dtype))


def adds_nothing(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> bool:
    """A shared expert with no neurons or all-zero weights (zero_ffn). Meta tensors have no values: only
    the width can tell."""
    if gate.shape[0] == 0:
        return True
    return not gate.is_meta and not (gate.any() or up.any() or down.any())


def pad_ffn(ffn: FFNWeights, multiple: int) -> FFNWeights:
    """`ffn` with zero neurons appended (they add nothing) up to a multiple of `multiple` neurons."""
    pad = -ffn.size % multiple
    if pad == 0:
        return ffn
    hidden = ffn.gate.shape[1]
    return FFNWeights(torch.cat([ffn.gate, ffn.gate.new_zeros(pad, hidden)]), torch.cat([ffn.up, ffn.up.new_zeros(pad, hidden)]),
                      torch.cat([ffn.down, ffn.down.new_zeros(hidden, pad)], dim=1))


def shared_blocks(shared_size: int, expert_size: int) -> int:
    return math.ceil(shared_size / expert_size)


class OutputFormat:
    name: ClassVar[str]
    architecture: ClassVar[str]
    config_class: ClassVar[type[PretrainedConfig]]
    dense_families: ClassVar[tuple[str, ...]]
    disk_prefix: ClassVar[str] = "model.layers.{layer}.mlp"
    # Canonical name -> key under disk_prefix; experts' (gate, up, down) keys take {expert}.
    disk_names: ClassVar[dict[str, str]] = {C.ROUTER: "gate.weight"}
    expert_disk_names: ClassVar[tuple[str, str, str]] = ("experts.{expert}.gate_proj.weight", "experts.{expert}.up_proj.weight",
                                                         "experts.{expert}.down_proj.weight")
    # The default on-disk layout: "per-expert" (one key per expert: what most engines read) or "fused"
    # (the stock model's in-memory names, experts as [E, 2S, D] / [E, D, S]: transformers 5 loads it unconverted).
    layout: ClassVar[str] = "per-expert"
    # Canonical name -> name in the loaded stock model under model.layers.L.mlp (transformers 5 fuses experts).
    module_names: ClassVar[dict[str, str]] = {C.ROUTER: "gate.weight", C.GATE_UP: "experts.gate_up_proj", C.DOWN: "experts.down_proj"}

    def supports(self, dense: PretrainedConfig, features: MoEFeatures) -> str | None:
        """None if this format holds an MoE of `dense` with `features` exactly, else what blocks it.
        The MLP gate is judged apart (no stock format has it): see formats.choose_format."""
        if dense.model_type not in self.dense_families:
            return f"{self.architecture} is made from {'/'.join(self.dense_families)} models, not {dense.model_type}"
        return None

    def moe_fields(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int, features: MoEFeatures) -> dict:
        raise NotImplementedError

    def make_config(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int,
                    features: MoEFeatures = MoEFeatures()) -> PretrainedConfig:
        accepted = _config_fields(self.config_class)
        values = {k: v for k, v in dense.to_dict().items() if k in accepted and k not in _NOT_COPIED}
        values.update(self.moe_fields(dense, num_experts, top_k, expert_size, features))
        config = self.config_class(**values)
        config.architectures = [self.architecture]
        config.dtype = dense.dtype
        return config

    def router_spec(self, config: PretrainedConfig) -> RouterSpec:
        """The routing a stock model of this format computes."""
        return RouterSpec()

    def from_construction(self, layer: MoELayer, expert_size: int) -> MoELayer:
        """A freshly constructed layer (ungated shared expert, if any) as this format holds it."""
        if layer.shared is not None:
            raise AssertionError(f"{self.architecture} has no shared expert")
        return self.complete(layer)

    # Engines that need an output projection even for tied embeddings (llama.cpp's qwen2moe): the
    # embedding is also written as lm_head.weight; the config stays tied, so training keeps them one.
    explicit_lm_head: ClassVar[bool] = False

    def zero_tensors(self, dense: PretrainedConfig, layer: int) -> dict[str, tuple[int, ...]]:
        """Tensors outside the MoE block that this format's engines need and a model of `dense` lacks, written
        as zeros (so they change nothing): on-disk key -> shape, for decoder layer `layer`."""
        return {}

    def engine_limits(self, config: PretrainedConfig, layout: str = "per-expert") -> list[str]:
        """One line per inference engine that would not compute (or read) this checkpoint exactly in
        this on-disk layout (build and export print them); empty when transformers, llama.cpp and vLLM
        all run it as written."""
        return []

    def complete(self, layer: MoELayer) -> MoELayer:
        """Add what the format always stores but the layer may lack (a zero shared expert, a zero bias)."""
        return layer

    def _names(self, index: int, layout: str) -> tuple[str, dict[str, str]]:
        """The key prefix of one layer and canonical name -> key suffix, in a layout."""
        if layout == "fused":
            return f"model.layers.{index}.mlp", self.module_names
        return self.disk_prefix.format(layer=index), self.disk_names

    def disk_tensors(self, index: int, layer: MoELayer, gate: str = "linear", layout: str | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """(on-disk key, tensor) of one layer: router (or moeify's MLP gate keys), experts, the rest."""
        layout = layout or self.layout
        layer = self.complete(layer)
        prefix, names = self._names(index, layout)
        if gate == "linear":
            yield f"{prefix}.{names[C.ROUTER]}", layer.router
        else:  # moeify's own keys, unknown to stock transformers: a stock load reports the router missing
            key_in, key_out = self.gate_disk_keys(index, layout)
            yield key_in, layer.router
            yield key_out, layer.router_mlp_out
        if layout == "fused":
            gate_up, down = zip(*layer.fused_experts())  # each expert made once for both tensors
            yield f"{prefix}.{names[C.GATE_UP]}", torch.stack(gate_up)
            yield f"{prefix}.{names[C.DOWN]}", torch.stack(down)
        else:
            for expert, weights in enumerate(layer.experts):
                for name, tensor in zip(self.expert_disk_names, (weights.gate, weights.up, weights.down)):
                    yield f"{prefix}.{name.format(expert=expert)}", tensor.contiguous()
        if layer.selection_bias is not None:
            if C.SELECTION_BIAS in names:
                yield f"{prefix}.{names[C.SELECTION_BIAS]}", layer.selection_bias.float()  # stock keeps it in fp32
            elif not layer.selection_bias.is_meta and layer.selection_bias.abs().max() > 0:
                raise MoeifyError(f"{self.architecture} cannot hold the aux-loss-free selection bias; build with --routing "
                                  "sigmoid-topk (DeepSeek-V3 format) or train without --bias-update-rate")
        if layer.shared is not None:
            for name, tensor in zip(C.SHARED, (layer.shared.gate, layer.shared.up, layer.shared.down)):
                yield f"{prefix}.{names[name]}", tensor
        if layer.shared_gate is not None:
            yield f"{prefix}.{names[C.SHARED_GATE]}", layer.shared_gate

    def keeps_fp32(self, key: str) -> bool:
        """Tensors the stock model holds in fp32 whatever the output dtype (the selection bias)."""
        return C.SELECTION_BIAS in self.disk_names and key.endswith(self.disk_names[C.SELECTION_BIAS])

    def gate_disk_keys(self, index: int, layout: str | None = None) -> tuple[str, str]:
        """moeify's MLP gate keys (in, out) of one layer."""
        prefix, names = self._names(index, layout or self.layout)
        router = f"{prefix}.{names[C.ROUTER]}".removesuffix(".weight")
        return f"{router}.mlp_in.weight", f"{router}.mlp_out.weight"

    def read_module(self, stock_mlp: torch.nn.Module, shared: bool | None = None) -> MoELayer:
        """The canonical tensors of a loaded stock MoE block (views of its parameters). A shared expert
        that adds nothing (adds_nothing: what `complete` writes for an MoE without one) counts as none;
        `shared` decides instead when given (the meta-device model of online upcycling has no values)."""
        state = dict(stock_mlp.state_dict(keep_vars=True))
        canonical = {name: state[stock].data for name, stock in self.module_names.items() if stock in state}
        if C.SHARED[0] in canonical:
            keep = shared if shared is not None else not adds_nothing(*(canonical[name] for name in C.SHARED))
            if not keep:
                canonical = {k: v for k, v in canonical.items() if k not in (*C.SHARED, C.SHARED_GATE)}
        return MoELayer.from_module_state(canonical)
