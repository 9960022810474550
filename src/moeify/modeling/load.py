"""Load any MoE directory moeify writes (stock formats, and moeify's own with an MLP gate) for training or evaluation."""

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from moeify.checkpoint.formats import format_of_model_type
from moeify.checkpoint.manifest import Manifest
from moeify.json_file import weight_map
from moeify.modeling.hf import MoEFeedForward, attach_moe_blocks, moe_layers


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in weight_map(index).values()})
    return [path / "model.safetensors"]


def load_moe_model(path: Path, device: torch.device | str = "cpu", dispatch: str = "auto", noisy: bool = False,
                   capacity_factor: float | None = None) -> tuple[torch.nn.Module, list[MoEFeedForward]]:
    """The model with moeify's MoE blocks attached (none for a dense model), fp32 on `device`."""
    path = Path(path)
    manifest = Manifest.read(path)
    gate = manifest.gate if manifest else "linear"
    verbosity = hf_logging.get_verbosity()
    if gate != "linear":  # the stock loader does not know the MLP gate's keys; moeify loads them below
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    blocks = attach_moe_blocks(model, dispatch, noisy, capacity_factor, gate=gate)
    if gate == "mlp":
        _load_mlp_gates(path, model, manifest.layout)
    return model.to(device), blocks


@torch.no_grad()
def _load_mlp_gates(path: Path, model: torch.nn.Module, layout: str) -> None:
    fmt = format_of_model_type(model.config.model_type)
    wanted = {}
    for index, moe in moe_layers(model).items():
        key_in, key_out = fmt.gate_disk_keys(index, layout)
        wanted[key_in], wanted[key_out] = moe.block.router.weight, moe.block.router.mlp_out
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in set(f.keys()) & set(wanted):
                wanted.pop(key).copy_(f.get_tensor(key))
    if wanted:
        raise AssertionError(f"{path} lacks the MLP gate tensors {sorted(wanted)[:2]}")
