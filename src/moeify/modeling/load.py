"""Load any MoE directory moeify writes (stock formats, and moeify's own with an MLP gate) for training or evaluation."""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from moeify.modeling.hf import MoEFeedForward, attach_moe_blocks, output_architecture_of

MANIFEST = "moeify.json"


def read_manifest(path: Path) -> dict:
    file = Path(path) / MANIFEST
    return json.loads(file.read_text()) if file.is_file() else {}


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [path / "model.safetensors"]


def load_moe_model(path: Path, device: torch.device | str = "cpu", dispatch: str = "auto", noisy: bool = False,
                   capacity_factor: float | None = None) -> tuple[torch.nn.Module, list[MoEFeedForward]]:
    """The model with moeify's MoE blocks attached (none for a dense model), fp32 on `device`."""
    path = Path(path)
    gate = read_manifest(path).get("router", {}).get("gate", "linear")
    verbosity = hf_logging.get_verbosity()
    if gate != "linear":  # the stock loader does not know the MLP gate's keys; moeify loads them below
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    blocks = attach_moe_blocks(model, dispatch, noisy, capacity_factor, gate=gate)
    if gate == "mlp":
        _load_mlp_gates(path, model, blocks)
    return model.to(device), blocks


@torch.no_grad()
def _load_mlp_gates(path: Path, model: torch.nn.Module, blocks: list[MoEFeedForward]) -> None:
    arch = output_architecture_of(model.config)
    wanted = {}
    for layer, block in enumerate(blocks):
        key_in, key_out = arch.gate_keys(layer, "mlp")
        wanted[key_in], wanted[key_out] = block.block.router.weight, block.block.router.mlp_out
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in set(f.keys()) & set(wanted):
                wanted.pop(key).copy_(f.get_tensor(key))
    if wanted:
        raise AssertionError(f"{path} lacks the MLP gate tensors {sorted(wanted)[:2]}")
