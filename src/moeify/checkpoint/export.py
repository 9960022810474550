"""`moeify export`: write an MoE that moeify built or trained as a stock transformers checkpoint,
verified by reloading it with stock transformers and comparing logits with moeify's model."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM

from moeify.checkpoint.atomic import check_output
from moeify.checkpoint.formats import format_of_model_type
from moeify.checkpoint.formats.base import print_engine_limits
from moeify.checkpoint.manifest import Manifest
from moeify.checkpoint.writer import DTYPES, cast_floating, write_checkpoint
from moeify.errors import MoeifyError
from moeify.modeling.hf import stock_state_dict
from moeify.modeling.load import load_moe_model

TOLERANCE = 1e-3
"""Of the largest |logit|: a wrong key, layout or scale moves logits by their own size; the order of fp32
sums (stock transformers' expert loop against moeify's grouped GEMM) moves a working model's by ~1e-6 of
it, and a barely working one's far more (SmolLM2's random split as built: 1.3e-4 of it, rounding amplified
over 30 layers of a random router's near-ties)."""


@dataclass
class ExportConfig:
    model: str
    """A built MoE directory or a training run."""
    out: Path
    """Output directory (created atomically)."""
    force: bool = False
    """Replace --out if it exists."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Output dtype of the weights; auto: as the model is stored (the selection bias stays fp32)."""
    layout: Literal["auto", "per-expert", "fused"] = "auto"
    """per-expert keys (llama.cpp, vLLM) | fused (transformers 5's own names); auto: the format's default."""


def run_export(config: ExportConfig) -> str:
    from moeify.evaluate.models import check_model

    out, diff = export_model(check_model(config.model), config.out, config.force, config.dtype, config.layout)
    return f"wrote {out} (stock reload: max |logit diff| {diff:.1e})"


def export_model(source: Path, out: Path, force: bool = False, dtype: str = "auto", layout: str = "auto") -> tuple[Path, float]:
    """The exported directory and the max |logit difference| between it (stock) and moeify's model
    (with its weights rounded to the output dtype, so the check stays exact for bf16 and fp16)."""
    check_output(out, force, [source])
    manifest = Manifest.read(source)
    if manifest is not None and manifest.gate != "linear":
        raise MoeifyError(
            f"cannot export {source}: its router is moeify's {manifest.gate} gate (Linear-tanh-Linear), which no stock transformers "
            "architecture represents; it stays in moeify's format (moeify train/eval/generate load it), or rebuild with --gate linear"
        )
    model, blocks = load_moe_model(source)
    if not blocks:
        raise MoeifyError(f"{source} is a dense model; there is nothing to export (build an MoE from it first)")
    if manifest is None:
        raise MoeifyError(f"{source} is a stock MoE checkpoint without moeify.json (moeify's record of how it was built); "
                          "export re-writes MoEs that moeify built or trained, and this one already loads in transformers")
    fmt = format_of_model_type(model.config.model_type)
    layout = fmt.layout if layout == "auto" else layout
    config = model.config
    if dtype != "auto":
        config.dtype = DTYPES[dtype]
        with torch.no_grad():  # the reference: moeify's model with the weights the export holds; buffers (RoPE
            for parameter in model.parameters():  # frequencies, the selection bias) stay fp32, as the stock reload computes them
                parameter.copy_(parameter.to(DTYPES[dtype]))
    tensors = stock_state_dict(model.state_dict(), config, layout)
    difference: dict[str, float] = {}

    def check(directory: Path) -> None:
        difference["max"], scale = _logit_difference(model, directory)
        if difference["max"] > TOLERANCE * max(1.0, scale):
            raise MoeifyError(f"the exported {fmt.architecture} differs from moeify's model (max |logit diff| "
                              f"{difference['max']:.2e}, largest |logit| {scale:.1f}); nothing written")

    items = cast_floating(sorted(tensors.items()), DTYPES.get(dtype), fmt.keeps_fp32)
    write_checkpoint(out, items, config, source, manifest.replace(format=fmt.name, exported_from=str(source), layout=layout),
                     force, check=check, reads=[source], verb="export")
    print_engine_limits(fmt, config, layout)
    return out, difference["max"]


@torch.no_grad()
def _logit_difference(model: torch.nn.Module, exported: Path) -> tuple[float, float]:
    """The max |logit difference| of the stock reload from moeify's model, and the largest |logit|."""
    ids = torch.randint(model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    stock = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    reference = model.eval()(ids).logits
    return (reference - stock(ids).logits).abs().max().item(), reference.abs().max().item()
