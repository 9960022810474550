"""`moeify plan-memory`: per-GPU bytes of an MoE training job, for the layout `moeify train` would use.

The MoE is instantiated on the meta device from the dense config (the same format and blocks the
trainer builds), and every parameter is sharded by the rules of train/parallelize.py: experts
split over `--ep`, each tensor sharded by FSDP2 on the dimension `shard_dim` picks, padded as FSDP2
pads. Parameters, gradients and AdamW state are exact (a test compares them with a real run);
communication buffers and activations are estimates from the shapes (formulas below). With the
memory it prints each optimizer step's collectives, their time over the links and the step time they
allow (plan_communication.py).
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from moeify.checkpoint.formats import MoEFeatures, choose_format
from moeify.construct.config import check_routing
from moeify.errors import MoeifyError
from moeify.modeling import canonical as C
from moeify.modeling.hf import attach_moe_blocks
from moeify.plan_communication import GPUS, Links, describe_step, plan_step
from moeify.schema import at_least, positive, validate
from moeify.train.parallelize import Layout, check_experts, check_layout, local_elements

# Published configurations of dense models users upcycle (no hub is needed to plan for them).
KNOWN_MODELS = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
EXPERT_TENSORS = (C.GATE_UP, C.DOWN)  # relative to model.layers.L.mlp.
GIB = 1024**3


@dataclass
class PlanMemoryConfig:
    RANGES: ClassVar[dict] = {"num_experts": at_least(1), "top_k": at_least(1), "gpus": at_least(1), "ep": at_least(1),
                              "hsdp": at_least(1), "seq_len": at_least(1), "micro_batch": at_least(1), "expert_size": at_least(1),
                              "loss_chunk": at_least(0), "batch_size": at_least(1), "gpus_per_node": at_least(1),
                              "intra_gbps": positive(), "inter_gbps": positive()}
    model: str
    """Dense model: a Hugging Face directory, a .gguf file, an embedded name, or llama-3-8b | llama-3-70b."""
    num_experts: int = 8
    top_k: int = 2
    expert_size: int | None = None
    """Neurons per expert; default: the dense FFN's (upcycling)."""
    gpus: int = 8
    """Ranks of the job (GPUs over all nodes)."""
    ep: int = 1
    hsdp: int = 1
    parallel: Literal["fsdp", "ddp"] = "fsdp"
    seq_len: int = 8192
    micro_batch: int = 1
    dtype: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    loss_chunk: int = 4096
    gradient_sync: Literal["micro-batch", "step"] = "micro-batch"
    """As `train --gradient-sync`: `step` keeps each rank's gathered gradients unsharded across micro-batches."""
    batch_size: int | None = None
    """Sequences per optimizer step over all ranks, as `train --batch-size`; default: one micro-batch a rank."""
    reshard_after_forward: bool = True
    gpu: Literal["h100", "h200", "a100"] = "h100"
    """Peak FLOP/s and default link rates of the step-time estimate."""
    gpus_per_node: int = 8
    intra_gbps: float | None = None
    """Gb/s a GPU sends within a node (default: the GPU's NVLink, 3600 for H100/H200, 2400 for A100)."""
    inter_gbps: float | None = None
    """Gb/s a GPU sends across nodes (default: one NIC a GPU, 400 for H100/H200, 200 for A100)."""
    json: bool = False


@dataclass
class MemoryPlan:
    layout: str
    total_params: int
    parameters: int  # bytes per GPU: fp32 master weights (sharded, padding included)
    gradients: int  # fp32, sharded like the parameters (--gradient-sync step: unsharded, what the rank gathers)
    optimizer: int  # AdamW's two fp32 moments of the local shard (rank 0, the largest)
    communication: int  # estimate: gathered parameters (root + 2 layers) and one layer's gradients before reduce-scatter
    activations: int  # estimate: what the backward keeps, per micro-batch
    total: int


def _dense_config(model: str):
    from moeify.checkpoint.dense import read_model_config
    from moeify.checkpoint.resolve import EMBEDDED_MODELS, resolve_model

    if model in KNOWN_MODELS:
        return LlamaConfig(**KNOWN_MODELS[model])
    if model not in EMBEDDED_MODELS and not Path(model).expanduser().exists():
        raise MoeifyError(f"no model at {model}; give a model directory, a .gguf file, or a name: "
                          f"{', '.join([*EMBEDDED_MODELS, *KNOWN_MODELS])}")
    return read_model_config(resolve_model(model))


def moe_meta_model(dense_config, num_experts: int, top_k: int, expert_size: int) -> torch.nn.Module:
    """The MoE `moeify train` would run, on the meta device (no memory)."""
    fmt, _ = choose_format(dense_config, MoEFeatures())
    config = fmt.make_config(dense_config, num_experts, top_k, expert_size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        attach_moe_blocks(model)
    return model


def plan_memory(model: torch.nn.Module, layout: Layout, seq_len: int, micro_batch: int, compute_bytes: int,
                activation_checkpointing: str = "none", loss_chunk: int = 4096, gradient_sync: str = "micro-batch") -> MemoryPlan:
    padded = rank0 = total = unsharded = 0
    layer_full = root_full = 0  # unsharded elements of the largest decoder layer / of the root
    layer_sizes: dict[int, int] = {}
    for name, param in model.named_parameters():
        expert = name.endswith(EXPERT_TENSORS)
        p, r = local_elements(tuple(param.shape), layout, expert)
        padded, rank0, total = padded + p, rank0 + r, total + param.numel()
        gathered = param.numel() // (layout.ep if expert else 1)  # a rank gathers only its own experts
        unsharded += gathered
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            layer_sizes[index] = layer_sizes.get(index, 0) + gathered
        else:
            root_full += gathered
    layer_full = max(layer_sizes.values(), default=0)
    sharded = layout.world > 1 and layout.parallel == "fsdp"
    communication = (root_full + 2 * layer_full) * compute_bytes + layer_full * 4 if sharded else 0
    config = model.config
    activations = _activation_bytes(config, seq_len * micro_batch, compute_bytes, activation_checkpointing, loss_chunk)
    gradients = unsharded * 4 if sharded and gradient_sync == "step" else padded * 4
    plan = MemoryPlan(layout.describe(), total, padded * 4, gradients, rank0 * 8, communication, activations, 0)
    plan.total = plan.parameters + plan.gradients + plan.optimizer + plan.communication + plan.activations
    return plan


def _activation_bytes(config, tokens: int, c: int, checkpointing: str, loss_chunk: int) -> int:
    """Saved for the backward per decoder layer (T tokens, c bytes per value):
    attention: norm output, q, k, v, attention output, o_proj output: T(3D + (H + 2KV + H) hd) c;
    MoE: norm output and router logits T(D c + 8E); per assignment (T k of them) the gathered input,
    gate/up output, activation and down output: T k (2D + 3F) c.
    full checkpointing keeps each layer's input (T D c) plus one layer recomputed; selective keeps the
    matmul outputs and recomputes the elementwise ones (the activation, norms). The output head adds
    one chunk's fp32 logits and their gradient: 8 min(T, chunk) V."""
    D, V, E, k = config.hidden_size, config.vocab_size, config.num_local_experts if hasattr(config, "num_local_experts") else config.num_experts, config.num_experts_per_tok
    H, KV = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or D // H
    F = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    attention = tokens * (3 * D + (2 * H + 2 * KV) * hd) * c
    moe = tokens * (D * c + 8 * E) + tokens * k * (2 * D + 3 * F) * c
    selective = tokens * ((H + 2 * KV + H) * hd + D) * c + tokens * (D * c + 8 * E) + tokens * k * (D + 2 * F + D) * c
    per_layer = {"none": attention + moe, "selective": selective, "full": tokens * D * c}[checkpointing]
    layers = config.num_hidden_layers * per_layer + (attention + moe if checkpointing == "full" else 0)
    head = 8 * min(tokens, loss_chunk or tokens) * V
    return layers + head


def run_plan_memory(config: PlanMemoryConfig) -> str:
    validate(config, "plan-memory")
    check_routing(config.num_experts, config.top_k)
    layout = Layout(config.gpus, config.ep, config.hsdp, config.parallel)
    check_layout(layout)
    check_experts(layout, config.num_experts)
    dense = _dense_config(config.model)
    if not hasattr(dense, "intermediate_size"):
        raise MoeifyError(f"{config.model} is not a dense model with an FFN (no intermediate_size); give the dense model")
    micro_batches = _micro_batches(config)
    model = moe_meta_model(dense, config.num_experts, config.top_k, config.expert_size or dense.intermediate_size)
    plan = plan_memory(model, layout, config.seq_len, config.micro_batch, 2 if config.dtype == "bf16" else 4,
                       config.activation_checkpointing, config.loss_chunk, config.gradient_sync)
    rates = GPUS[config.gpu]
    links = Links(config.gpu, config.gpus_per_node, config.intra_gbps or rates["intra_gbps"], config.inter_gbps or rates["inter_gbps"])
    step = plan_step(model, layout, config.micro_batch, config.seq_len, micro_batches, config.dtype, links, config.gradient_sync,
                     config.reshard_after_forward, config.activation_checkpointing)
    if config.json:
        return json.dumps({**asdict(plan), "step": asdict(step), "links": asdict(links)}, indent=2)
    unsharded = "unsharded" if config.gradient_sync == "step" and config.gpus > 1 and config.parallel == "fsdp" else ""
    rows = [("parameters (fp32)", plan.parameters), (f"gradients ({unsharded or 'fp32'})", plan.gradients), ("AdamW state (fp32)", plan.optimizer),
            ("communication buffers*", plan.communication), ("activations*", plan.activations), ("total", plan.total)]
    head = (f"{config.model} -> {config.num_experts} experts, top-{config.top_k}: {plan.total_params / 1e9:.2f}B parameters; "
            f"{config.gpus} GPUs, {plan.layout}; micro-batch {config.micro_batch} x {config.seq_len} tokens, "
            f"activation checkpointing {config.activation_checkpointing}")
    lines = [head, *(f"  {label:<24}{value / GIB:9.2f} GiB" for label, value in rows),
             "  * estimates from the shapes (see moeify/plan_memory.py); the rest is exact"]
    return "\n".join(lines + describe_step(step, links, config.dtype, micro_batches))


def _micro_batches(config: PlanMemoryConfig) -> int:
    """Micro-batches a rank runs per optimizer step (every rank, EP included, takes its own sequences)."""
    if config.batch_size is None:
        return 1
    per_step = config.micro_batch * config.gpus
    if config.batch_size % per_step:
        raise MoeifyError(f"--batch-size {config.batch_size} must be a multiple of --micro-batch {config.micro_batch} "
                          f"x {config.gpus} GPUs; choose a multiple of {per_step}")
    return config.batch_size // per_step
