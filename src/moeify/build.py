"""`moeify build`: dense checkpoint -> MoE checkpoint in a stock transformers format (or moeify's own)."""

import hashlib
import json
import re
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

import moeify
from moeify.checkpoint.atomic import atomic_directory, check_output_dir
from moeify.checkpoint.dense import DenseCheckpoint, is_ffn_tensor
from moeify.checkpoint.formats import MoEFeatures, OutputArchitecture, architecture_for
from moeify.checkpoint.resolve import resolve_model
from moeify.checkpoint.writer import DEFAULT_SHARD_BYTES, ShardedWriter
from moeify.construct import ConstructionPlan, MethodOptions, expert_weights
from moeify.errors import MoeifyError
from moeify.modeling.router import GATES, ROUTINGS, RouterSpec

from moeify.modeling.load import MANIFEST
MOEIFY_FORMAT = "moeify"  # what the manifest's "format" says when no stock architecture holds the model
# Files of the dense directory that describe the tokenizer or generation and travel unchanged.
CARRIED_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|chat_template\.(jinja|json)|generation_config\.json|.*\.model|vocab\.json|merges\.txt)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(kw_only=True)
class BuildConfig(MethodOptions):
    model: str
    """Dense model: a Hugging Face directory, a .gguf file, or an embedded name (smollm2-135m)."""
    out: Path
    """Output directory (created atomically)."""
    partition: Path | None = None
    """A `moeify split` partition file; replaces --method and its options."""
    top_k: int = 2
    routing: str = "topk-softmax"
    """topk-softmax | softmax-topk | sigmoid-topk."""
    renormalize: bool = True
    """softmax-topk / sigmoid-topk: renormalise the k kept scores."""
    gate: str = "linear"
    """linear | mlp (LLaMA-MoE's Linear-tanh-Linear; moeify format only)."""
    router_std: float = 0.02
    """Router initialised N(0, router_std); 0 gives zeros (uniform routing)."""
    router_init: str = "auto"
    """auto | normal | virtual-group (granular-upcycle) | centroids (clustering)."""
    scale: float | None = None
    """Output scale folded into each expert's down projection; default: the method's (E/k for splits)."""
    format: str | None = None
    """Output architecture (mixtral, qwen2_moe, qwen3_moe, deepseek-v3); default: the first that holds the model exactly."""
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    force: bool = False

    def method_options(self) -> MethodOptions:
        return MethodOptions(**{f.name: getattr(self, f.name) for f in fields(MethodOptions)})

    def router_spec(self) -> RouterSpec:
        if self.routing not in ROUTINGS:
            raise MoeifyError(f"--routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.gate not in GATES:
            raise MoeifyError(f"--gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        return RouterSpec(self.routing, self.renormalize or self.routing == "topk-softmax", self.gate)


def check_routing(num_experts: int, top_k: int) -> None:
    if num_experts < 1:
        raise MoeifyError(f"--experts must be at least 1, got {num_experts}")
    if top_k < 1:
        raise MoeifyError(f"--top-k must be at least 1, got {top_k}")
    if top_k > num_experts:
        raise MoeifyError(f"--top-k {top_k} is larger than --experts {num_experts}; choose top-k <= experts")


def output_architecture(dense: DenseCheckpoint, features: MoEFeatures, name: str | None) -> tuple[OutputArchitecture, str]:
    """The architecture whose layout the model is written in, and the format name ('moeify' when
    a feature such as the MLP gate has no stock equivalent)."""
    if name == MOEIFY_FORMAT:
        name = None
    linear = MoEFeatures(RouterSpec(features.router.routing, features.router.renormalize), features.shared_size)
    arch = architecture_for(dense.config, linear, name)
    return arch, arch.name if features.router.gate == "linear" else MOEIFY_FORMAT


def build(config: BuildConfig, progress: bool = True) -> Path:
    options = config.method_options()
    if config.partition is None:
        check_routing(config.num_experts, config.top_k)
    if config.router_std < 0:
        raise MoeifyError(f"--router-std must be >= 0, got {config.router_std}")
    router = config.router_spec()
    out = Path(config.out)
    check_output_dir(out, config.force)
    dense = DenseCheckpoint(resolve_model(config.model))
    plan = ConstructionPlan.make(dense, options, config.partition, config.model, progress)
    E, k = plan.num_experts, config.top_k
    check_routing(E, k)
    features = MoEFeatures(router, plan.shared_size)
    arch, format_name = output_architecture(dense, features, config.format)
    moe_config = arch.make_config(dense.config, E, k, plan.expert_size, features)
    scale = plan.scale(k, router, config.scale)
    router_init = plan.router_init(config.router_init)
    dtype = dense.dtype()

    layer_names: dict[int, list[str]] = {}
    other_names: list[str] = []
    for name in dense.tensor_names:
        match = _LAYER.match(name)
        if match:
            layer_names.setdefault(int(match.group(1)), []).append(name)
        else:
            other_names.append(name)

    with atomic_directory(out, config.force) as tmp:
        writer = ShardedWriter(tmp, config.max_shard_bytes)
        for name in sorted(n for n in other_names if n.startswith("model.embed")):
            writer.add(name, dense.get(name))
        for layer in tqdm(range(dense.num_layers), desc=f"build {plan.method.name}", unit="layer", disable=not progress, file=sys.stderr):
            for name in sorted(layer_names.get(layer, [])):
                if not is_ffn_tensor(name):
                    writer.add(name, dense.get(name))
            router_weight = plan.router_weight(layer, dense.hidden_size, config.router_std, router_init, dtype)
            gate_keys = arch.gate_keys(layer, router.gate)
            writer.add(gate_keys[0], router_weight)
            if router.gate == "mlp":  # Linear(E, E) after tanh starts as the identity: the MLP gate begins like the linear one
                writer.add(gate_keys[1], torch.eye(E, dtype=dtype))
            ffn = dense.ffn(layer)
            experts, shared = plan.layer(layer)
            for expert in range(E):
                for key, tensor in zip(arch.expert_keys(layer, expert), plan.expert_weights(ffn, experts[expert], scale, layer, expert)):
                    writer.add(key, tensor)
            shared_weights = expert_weights(*ffn, shared, 1.0) if len(shared) else None
            for key, tensor in arch.layer_tensors(layer, shared_weights, dense.hidden_size, plan.expert_size, E, dtype).items():
                writer.add(key, tensor)
        for name in sorted(n for n in other_names if not n.startswith("model.embed")):
            writer.add(name, dense.get(name))
        writer.close()

        moe_config.save_pretrained(tmp)
        for file in sorted(dense.path.iterdir()):
            if file.is_file() and CARRIED_FILES.match(file.name):
                shutil.copyfile(file, tmp / file.name)
        manifest = construction_manifest(dense, config.model, arch.architecture, plan, k, router, config.router_std, scale)
        manifest.update(format=format_name, router_init=router_init, source_sha256=weights_digest(dense.files()))
        if config.partition is not None:
            manifest["partition"] = str(config.partition)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def construction_manifest(dense: DenseCheckpoint, source: str, architecture: str, plan: ConstructionPlan, top_k: int,
                          router: RouterSpec, router_std: float, scale: float) -> dict:
    """What moeify.json records about how an MoE was made (by `build` and by online upcycling)."""
    return {
        "moeify_version": moeify.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "source_model": source,
        "source_path": str(dense.path),
        "source_family": dense.family,
        "architecture": architecture,
        "method": plan.method.name,
        "num_experts": plan.num_experts,
        "top_k": top_k,
        "expert_size": plan.expert_size,
        "shared_size": plan.shared_size,
        "scale": scale,
        "seed": plan.options.seed,
        "router_std": router_std,
        "router": asdict(router),
        "options": {k: v for k, v in asdict(plan.options).items() if v is not None},
    }


def weights_digest(files: list[Path]) -> str:
    """sha256 over the weight files' names and bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
