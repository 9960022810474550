"""Training configuration: one dataclass, loaded from a YAML recipe and overridden by CLI flags."""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from moeify.errors import MoeifyError
from moeify.schema import at_least, fraction, from_flat, positive, seed_range
from moeify.yaml_file import read_yaml


@dataclass
class TrainConfig:
    RANGES: ClassVar[dict] = {
        "seq_len": at_least(2), "batch_size": at_least(1), "micro_batch": at_least(1), "max_tokens": at_least(1), "lr": positive(),
        "min_lr_ratio": fraction(), "warmup_steps": at_least(0), "weight_decay": at_least(0), "beta1": fraction(True, False),
        "beta2": fraction(True, False), "grad_clip": at_least(0), "dynamic_eta": positive(), "eval_every": at_least(0),
        "eval_blocks": at_least(1), "balance_coef": at_least(0), "z_loss_coef": at_least(0), "bias_update_rate": at_least(0),
        "capacity_factor": positive(), "checkpoint_every": at_least(0), "keep_checkpoints": at_least(1), "peak_tflops": positive(),
        "log_every": at_least(1), "loss_chunk": at_least(0), "ep": at_least(1), "hsdp": at_least(1),
        "distill_alpha": fraction(), "distill_temperature": positive(), "seed": seed_range(),
    }
    model: str = "smollm2-135m"
    """Model to train: an MoE or dense Hugging Face directory, a .gguf file or an embedded name."""
    from_dense: str | None = None
    """Online upcycling: build the MoE from this dense model inside the job, each rank only its shards
    (then --model is ignored; the construction flags or the recipe's build: section say how)."""
    out: str = "moeify-run"
    """Run directory: metrics, checkpoints, and the final model in `model/`."""
    data: str | None = None
    """Prepared data directory (`moeify data prepare`); default: the embedded corpus for this model."""
    seq_len: int = 512
    """Block length when the embedded corpus is prepared on the fly."""
    batch_size: int = 8
    """Global batch in sequences per optimizer step, whatever the number of ranks."""
    micro_batch: int = 4
    """Sequences per rank per forward pass; gradient accumulation makes up the rest."""
    max_tokens: int = 200_000
    """Token budget; steps = max_tokens // (batch_size * seq_len)."""
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    domain_weights: str = "proportional"
    """Static weights: uniform | proportional | llama | sheared-llama | a=0.5,b=0.5 (initial weights if dynamic)."""
    dynamic: Literal["softmax", "clipped-exp"] | None = None
    """Dynamic domain weights (Sheared-LLaMA): softmax | clipped-exp; None keeps them static."""
    dynamic_eta: float = 1.0
    reference_losses: str | None = None
    """Per-domain reference losses a=2.1,b=3.0 for dynamic sampling; default: measured on the reference model."""
    reference_model: str | None = None
    """Model whose held-out losses are the references; default: the dense source in moeify.json."""
    eval_every: int = 0
    """Evaluate held-out loss per domain every N steps (0: only at start and end; dynamic needs N > 0)."""
    eval_blocks: int = 8
    """Held-out blocks per domain per evaluation."""
    balance_loss: Literal["switch", "cv2", "none"] = "switch"
    """switch (E * sum f P) | cv2 (LLaMA-MoE CV^2 importance + load) | none."""
    balance_coef: float = 0.01
    cv2_variance: Literal["population", "unbiased"] = "population"
    """cv2: the variance in CV^2, population or unbiased (LLaMA-MoE's torch.var: E/(E-1) times larger)."""
    cv2_load: Literal["smooth", "llama-moe", "count"] = "smooth"
    """cv2 with --noisy-gate: the load term as Shazeer's differentiable P(expert in top k) summed over
    tokens; `llama-moe` as LLaMA-MoE's code computes it (in or out of the top k judged by the noise term
    alone); or as counts (no gradient through the load)."""
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): selection-bias step per optimizer step; 0 disables."""
    noisy_gate: bool = False
    capacity_factor: float | None = None
    """Tokens over CF * T * k / E per expert are dropped; None is dropless."""
    trainable: str = "all"
    """all | moe (the MoE blocks only) | frozen-router (all but the routers) | a comma list of the MoE blocks'
    parts: router, experts (the routed experts, their output scales folded in), shared (the shared expert and its gate)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in the backward: full (each decoder layer keeps only its input) | selective
    (keeps matmul and attention outputs, recomputes norms and activations) | none."""
    loss_chunk: int = 4096
    """Positions per chunk of the output projection and cross-entropy in training, each chunk's logits
    recomputed in the backward instead of kept (0: the whole micro-batch's logits at once)."""
    gradient_sync: Literal["micro-batch", "step"] = "micro-batch"
    """FSDP2 with gradient accumulation: reduce-scatter the gradients after every micro-batch (sharded
    gradients: least memory) or once per optimizer step (unsharded gradients kept between micro-batches: the
    whole model's gradients per rank, 1/accumulation of the traffic). DDP, and HSDP across replicas, always
    reduce once per step."""
    reshard_after_forward: bool = True
    """FSDP2: free each layer's gathered parameters after its forward (less memory) or keep them for the
    backward (one all-gather fewer per layer)."""
    distill: bool = False
    """Recover the MoE by distillation from its dense parent (moeify.json's source, or --teacher): the loss is
    alpha tau^2 KL(teacher || student, both at temperature tau) + (1 - alpha) next-token cross-entropy."""
    layerwise: bool = False
    """Layer-wise distillation (LaDiMo): each MoE block learns to reproduce its dense parent FFN's output on the
    dense model's own hidden states, all layers from one teacher forward; only the MoE blocks run in the student
    (the loss is their mean relative squared error). Follow it with --distill on the run's model."""
    teacher: str | None = None
    """--distill and --layerwise: the teacher (a dense model with the student's tokenizer); default: the dense model the MoE was
    built from (with --from-dense, that model)."""
    distill_alpha: float = 1.0
    """--distill: weight of the KL term (1: distillation alone, 0: cross-entropy alone); on SmolLM2 1 suited a
    random split, 0.5 a carve (which starts near its parent), docs/training.md."""
    distill_temperature: float = 1.0
    """--distill: softmax temperature tau of teacher and student in the KL term (scaled by tau^2, Hinton)."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute precision: bf16 (fp32 master weights, optimizer state and gradient reduction) or fp32;
    auto: bf16 on GPU, fp32 on CPU."""
    compile: bool = False
    """torch.compile each decoder layer (the MoE block compiles without graph breaks)."""
    parallel: Literal["fsdp", "ddp"] = "fsdp"
    """With several ranks: fsdp (FSDP2 fully_shard per layer) | ddp."""
    ep: int = 1
    """Expert parallelism: groups of N consecutive ranks split the experts (N divides the experts and the
    ranks of a shard group); tokens travel to their experts with all-to-all."""
    hsdp: int = 1
    """HSDP: R replicas, each sharded by FSDP2 over ranks / R (all-gathers stay within a replica)."""
    dispatch: Literal["auto", "grouped_mm", "loop", "reference"] = "auto"
    """MoE dispatch kernel: auto (grouped_mm where the shapes allow, else loop) | grouped_mm | loop | reference."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    resume: bool = False
    """Continue from the newest complete checkpoint in `out`."""
    force: bool = False
    """Start afresh even if `out` holds an earlier run."""
    peak_tflops: float | None = None
    """Peak FLOP/s for MFU; default: a table for known GPUs, a measured fp32 matmul rate on CPU."""
    log_every: int = 1
    count_collectives: bool = False
    """Log each optimizer step's collectives on rank 0 (`collectives` in metrics.jsonl: calls and bytes per kind
    and process group), to check a layout's communication."""
    export: bool = True
    """Write the final model in its stock transformers format to `out/model`."""


def load_recipe(path: Path, section: str = "train") -> dict:
    """The `section` mapping of a YAML recipe (or the whole file if it has no sections)."""
    document = read_yaml(path, f"recipe {path}", "see recipes/ for examples")
    if not isinstance(document, dict):
        raise MoeifyError(f"recipe {path} must be a YAML mapping")
    if not {"build", "train"} & set(document):
        return document
    found = document.get(section) or {}
    if not isinstance(found, dict):
        raise MoeifyError(f"recipe {path}: its {section}: section is a {type(found).__name__}; it must be a mapping of settings "
                          "(see recipes/ for examples)")
    return found


def recipe_values(path: Path, section: str) -> dict:
    """Flat settings a verb takes from a recipe: the build: section for build/split/compare-init; for
    train the train: section over the build: section (online upcycling constructs from it; its seed
    is the training seed)."""
    values = dict(load_recipe(path, section))
    if section == "train":
        build = {k: v for k, v in load_recipe(path, "build").items() if k != "seed"}
        values = {**build, **values}
    return values


def make_config(recipe: dict, overrides: dict) -> TrainConfig:
    """A TrainConfig from a recipe's train: section and overrides (types and names checked)."""
    return from_flat(TrainConfig, {**recipe, **{k: v for k, v in overrides.items() if v is not None}}, "the training settings")
