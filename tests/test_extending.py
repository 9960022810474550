"""Adding a construction method and an output format from outside the package: one class each and
one registry call, then build, reload with stock transformers, and map back losslessly."""

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from moeify.build import build, build_config
from moeify.checkpoint.formats import FORMATS, register_format
from moeify.checkpoint.formats.mixtral import Mixtral
from moeify.construct import METHODS, ConstructionConfig, ConstructionMethod, register_method
from moeify.modeling.hf import stock_state_dict
from moeify.modeling.load import load_moe_model
from tests.conftest import logits_of

IDS = torch.randint(320, (2, 16), generator=torch.Generator().manual_seed(2))


class InterleavedSplit(ConstructionMethod):
    """Toy method: expert e takes neurons e, e + E, e + 2E, ... (no data, one layer at a time)."""

    name = "toy-interleaved"
    description = "neuron j goes to expert j mod E"

    def expert_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        return ffn_size // options.num_experts

    def layer_partition(self, ffn_size: int, options: ConstructionConfig, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        E = options.num_experts
        return torch.arange(ffn_size).view(-1, E).t().contiguous(), torch.zeros(0, dtype=torch.long)


class ToyMixtralConfig(MixtralConfig):
    model_type = "toy_mixtral"


class ToyMixtralForCausalLM(MixtralForCausalLM):
    config_class = ToyMixtralConfig


class FusedToyMixtral(Mixtral):
    """Toy format: Mixtral's model with the experts stored fused, as transformers 5 holds them in memory."""

    name = "toy-fused-mixtral"
    architecture = "ToyMixtralForCausalLM"
    config_class = ToyMixtralConfig
    disk_prefix = "model.layers.{layer}.mlp"
    layout = "fused"


def _register() -> None:
    if InterleavedSplit.name not in METHODS:
        register_method(InterleavedSplit())
    if FusedToyMixtral.name not in FORMATS:
        register_format(FusedToyMixtral())
        AutoConfig.register(ToyMixtralConfig.model_type, ToyMixtralConfig)
        AutoModelForCausalLM.register(ToyMixtralConfig, ToyMixtralForCausalLM)


def test_a_toy_method_and_a_toy_format_build_reload_and_round_trip(tiny_models, tmp_path):
    _register()
    dense = tiny_models["llama"]
    # With k = E and a zero router every expert has weight 1/E; scale E restores the dense FFN exactly.
    out = build(build_config(model=str(dense), out=tmp_path / "moe", method="toy-interleaved", num_experts=4, top_k=4,
                             router_std=0.0, scale=4.0, format="toy-fused-mixtral"), progress=False)
    on_disk = load_file(out / "model.safetensors")
    up = load_file(dense / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    gate_up = on_disk["model.layers.1.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (4, 48, 64) and torch.equal(gate_up[1, 24:], up[1::4])  # expert 1: neurons 1, 5, 9, ...
    assert (logits_of(out, IDS) - logits_of(dense, IDS)).abs().max() < 1e-4  # stock reload of the new format

    model, blocks = load_moe_model(out)
    assert len(blocks) == 2
    back = stock_state_dict(model.state_dict(), model.config)
    assert sorted(back) == sorted(on_disk)
    assert all(torch.equal(back[name], on_disk[name]) for name in on_disk)
