"""`moeify build`: dense checkpoint -> MoE checkpoint in a stock transformers format."""

import hashlib
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import moeify
from moeify.checkpoint.atomic import atomic_directory, check_output_dir
from moeify.checkpoint.dense import DenseCheckpoint, is_ffn_tensor
from moeify.checkpoint.formats import architecture_for
from moeify.checkpoint.resolve import resolve_model
from moeify.checkpoint.writer import DEFAULT_SHARD_BYTES, ShardedWriter
from moeify.construct import ConstructionMethod, expert_weights, get_method, init_router
from moeify.errors import MoeifyError

MANIFEST = "moeify.json"
# Files of the dense directory that describe the tokenizer or generation and travel unchanged.
CARRIED_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|chat_template\.(jinja|json)|generation_config\.json|.*\.model|vocab\.json|merges\.txt)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class BuildConfig:
    model: str
    """Dense model: a Hugging Face directory, a .gguf file, or an embedded name (smollm2-135m)."""
    out: Path
    """Output directory (created atomically)."""
    method: str = "upcycle"
    """Construction method: upcycle | random-split."""
    num_experts: int = 8
    top_k: int = 2
    seed: int = 0
    router_std: float = 0.02
    """Router initialised N(0, router_std); 0 gives zeros (uniform routing)."""
    scale: float | None = None
    """Output scale folded into each expert's down projection; default: the method's (E/k for splits)."""
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    force: bool = False


def check_routing(num_experts: int, top_k: int) -> None:
    if num_experts < 1:
        raise MoeifyError(f"--experts must be at least 1, got {num_experts}")
    if top_k < 1:
        raise MoeifyError(f"--top-k must be at least 1, got {top_k}")
    if top_k > num_experts:
        raise MoeifyError(f"--top-k {top_k} is larger than --experts {num_experts}; choose top-k <= experts")


def build(config: BuildConfig, progress: bool = True) -> Path:
    check_routing(config.num_experts, config.top_k)
    if config.router_std < 0:
        raise MoeifyError(f"--router-std must be >= 0, got {config.router_std}")
    method = get_method(config.method)
    out = Path(config.out)
    check_output_dir(out, config.force)
    dense = DenseCheckpoint(resolve_model(config.model))
    E, k, F = config.num_experts, config.top_k, dense.ffn_size
    method.check(F, E)
    arch = architecture_for(dense.config)
    scale = method.default_scale(E, k) if config.scale is None else config.scale
    expert_size = method.expert_size(F, E)
    moe_config = arch.make_config(dense.config, E, k, expert_size)
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
        for layer in tqdm(range(dense.num_layers), desc=f"build {method.name}", unit="layer", disable=not progress, file=sys.stderr):
            for name in sorted(layer_names.get(layer, [])):
                if not is_ffn_tensor(name):
                    writer.add(name, dense.get(name))
            writer.add(arch.router_key(layer), init_router(E, dense.hidden_size, config.router_std, config.seed, layer, dtype))
            gate, up, down = dense.ffn(layer)
            for expert, neurons in enumerate(method.neuron_groups(F, E, layer, config.seed)):
                for key, tensor in zip(arch.expert_keys(layer, expert), expert_weights(gate, up, down, neurons, scale)):
                    writer.add(key, tensor)
            for key, tensor in arch.extra_layer_tensors(layer, dense.hidden_size, dtype).items():
                writer.add(key, tensor)
        for name in sorted(n for n in other_names if not n.startswith("model.embed")):
            writer.add(name, dense.get(name))
        writer.close()

        moe_config.save_pretrained(tmp)
        for file in sorted(dense.path.iterdir()):
            if file.is_file() and CARRIED_FILES.match(file.name):
                shutil.copyfile(file, tmp / file.name)
        manifest = construction_manifest(dense, config.model, arch.architecture, method, E, k, config.seed,
                                         config.router_std, config.scale)
        manifest["source_sha256"] = weights_digest(dense.files())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def construction_manifest(dense: DenseCheckpoint, source: str, architecture: str, method: ConstructionMethod,
                          num_experts: int, top_k: int, seed: int, router_std: float, scale: float | None) -> dict:
    """What moeify.json records about how an MoE was made (by `build` and by online upcycling)."""
    return {
        "moeify_version": moeify.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "source_model": source,
        "source_path": str(dense.path),
        "source_family": dense.family,
        "architecture": architecture,
        "method": method.name,
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_size": method.expert_size(dense.ffn_size, num_experts),
        "scale": method.default_scale(num_experts, top_k) if scale is None else scale,
        "seed": seed,
        "router_std": router_std,
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
