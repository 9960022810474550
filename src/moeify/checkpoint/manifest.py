"""moeify.json: how an MoE directory was made. Only this module reads or writes the file."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import moeify
from moeify.errors import MoeifyError

MANIFEST = "moeify.json"


@dataclass
class Manifest:
    source_model: str
    """What the user named (path, .gguf or embedded name)."""
    source_path: str
    """The dense safetensors directory it resolved to."""
    source_family: str
    architecture: str
    """The stock class whose layout the weights are in."""
    format: str
    """The format name (mixtral, qwen2_moe, ...), or `moeify` for an MLP gate no stock class holds."""
    method: str
    num_experts: int
    top_k: int
    expert_size: int
    shared_size: int
    scale: float
    seed: int
    router: dict
    """routing, renormalize, gate, router_std, router_init."""
    options: dict
    """The method and its options (construct.config.method_options)."""
    source_sha256: str | None = None
    partition: str | None = None
    refit: dict | None = None
    """build --refit: the calibration text the routers and down projections were refitted on."""
    built_online: bool = False
    exported_from: str | None = None
    training: dict | None = None
    layout: str = "per-expert"
    """On-disk layout of the MoE tensors: per-expert keys or transformers 5's fused names."""
    scale_placement: str = "fold"
    """On disk the scale is always folded into down_proj; `multiplier`: training holds it as a factor on
    the routed experts' outputs instead (LLaMA-MoE), folded back when the model is written."""
    moeify_version: str = field(default_factory=lambda: moeify.__version__)
    torch_version: str = field(default_factory=lambda: torch.__version__.split("+")[0])

    @property
    def gate(self) -> str:
        return self.router.get("gate", "linear")

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> "Manifest | None":
        """The manifest of an MoE directory; None for a directory without one (a stock or dense model)."""
        path = Path(directory) / MANIFEST
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise MoeifyError(f"cannot read {path}: {error}; rebuild the model or delete the file") from None
        if not isinstance(values, dict):
            raise MoeifyError(f"{path} is not a moeify manifest; rebuild the model with `moeify build`")
        known = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = required - set(values)
        if missing:
            raise MoeifyError(f"{path} is not a moeify manifest of this version (missing {', '.join(sorted(missing))}); "
                              "rebuild the model with `moeify build`")
        return cls(**{k: v for k, v in values.items() if k in known})

    def replace(self, **changes) -> "Manifest":
        return dataclasses.replace(self, **changes)
