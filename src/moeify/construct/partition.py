"""Partition files: which dense FFN neurons each expert (and the shared block) of every layer holds.

A partition is a safetensors file: per layer `layers.L.experts` int32 [E, S] (sorted neuron indices
per expert), `layers.L.shared` int32 [S0] (the always-active block, possibly empty) and, for
clustering, `layers.L.centroids` fp32 [E, D]; for carving, `layers.L.router` fp32 [E, D] (the fitted router rows),
`layers.L.selection_bias` fp32 [E] and `layers.L.expert_scales` fp32 [E] (output factors); the header metadata holds the method, its options
and a fingerprint of the dense model. Written deterministically (same inputs, same bytes).
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.writer import write_safetensors
from moeify.errors import MoeifyError

FORMAT = "moeify-partition/2"
OPTIONAL_TENSORS = ("centroids", "router", "selection_bias", "expert_scales")  # fp32 per-layer tensors some methods add


def model_fingerprint(dense: DenseCheckpoint) -> dict:
    """Shapes plus a hash of layer 0's up projection: enough to tell one model from another cheaply."""
    up = dense.get("model.layers.0.mlp.up_proj.weight").contiguous()
    digest = hashlib.sha256(up.view(torch.uint8).numpy().tobytes()).hexdigest()
    return {"num_layers": dense.num_layers, "hidden_size": dense.hidden_size, "ffn_size": dense.ffn_size,
            "layer0_up_sha256": digest}


@dataclass
class Partition:
    method: str
    num_experts: int
    expert_size: int
    shared_size: int
    experts: list[torch.Tensor]  # per layer [E, expert_size], sorted rows
    shared: list[torch.Tensor]  # per layer [shared_size]
    model: dict  # model_fingerprint of the dense model it was made from
    options: dict = field(default_factory=dict)  # the method options it was made with (construct.config.method_options)
    stats: dict = field(default_factory=dict)  # per-layer statistics (k-means objective, METIS edge cut, grouping)
    centroids: list[torch.Tensor] | None = None  # per layer [E, D], clustering only
    router: list[torch.Tensor] | None = None  # per layer [E, D] fitted router rows (carve)
    selection_bias: list[torch.Tensor] | None = None  # per layer [E] (carve)
    expert_scales: list[torch.Tensor] | None = None  # per layer [E] output factors (carve)

    @property
    def num_layers(self) -> int:
        return len(self.experts)

    def save(self, path: Path) -> Path:
        tensors: dict[str, torch.Tensor] = {}
        for layer in range(self.num_layers):
            tensors[f"layers.{layer}.experts"] = self.experts[layer].to(torch.int32).contiguous()
            tensors[f"layers.{layer}.shared"] = self.shared[layer].to(torch.int32).contiguous()
            for name in OPTIONAL_TENSORS:
                values = getattr(self, name)
                if values is not None:
                    tensors[f"layers.{layer}.{name}"] = values[layer].float().contiguous()
        header = {"format": FORMAT, "method": self.method, "num_experts": self.num_experts, "expert_size": self.expert_size,
                  "shared_size": self.shared_size, "model": self.model, "options": self.options, "stats": self.stats}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, tensors, {"moeify": json.dumps(header, sort_keys=True)})
        return path

    @staticmethod
    def is_partition_file(path: Path) -> bool:
        """Whether `path` is a partition file moeify wrote (of any version)."""
        try:
            with safe_open(str(path), framework="pt") as f:
                return json.loads((f.metadata() or {}).get("moeify", "{}")).get("format", "").startswith("moeify-partition/")
        except (SafetensorError, OSError, json.JSONDecodeError, AttributeError):
            return False

    @classmethod
    def load(cls, path: Path) -> "Partition":
        path = Path(path)
        if not path.is_file():
            raise MoeifyError(f"partition file {path} does not exist; make one with `moeify split`")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("moeify", "{}"))
                if header.get("format") != FORMAT:
                    raise MoeifyError(f"{path} is not a moeify partition file; make one with `moeify split`")
                layers = header["model"]["num_layers"]
                experts = [f.get_tensor(f"layers.{i}.experts").long() for i in range(layers)]
                shared = [f.get_tensor(f"layers.{i}.shared").long() for i in range(layers)]
                optional = {name: [f.get_tensor(f"layers.{i}.{name}") for i in range(layers)]
                            for name in OPTIONAL_TENSORS if f"layers.0.{name}" in f.keys()}
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
            raise MoeifyError(f"cannot read partition file {path} ({error}); make it again with `moeify split`") from None
        return cls(header["method"], header["num_experts"], header["expert_size"], header["shared_size"], experts, shared,
                   header["model"], header["options"], header.get("stats", {}), **optional)

    def check_model(self, dense: DenseCheckpoint, source: str) -> None:
        """Refuse a partition made from another model."""
        mine = model_fingerprint(dense)
        if mine != self.model:
            shapes = {k: v for k, v in self.model.items() if k != "layer0_up_sha256"}
            raise MoeifyError(
                f"this partition was made from another model ({shapes}); run `moeify split {source} ...` to make one for it"
            )
