"""`moeify export`: write an MoE that moeify built or trained as a stock transformers checkpoint,
verified by reloading it with stock transformers and comparing logits with moeify's model."""

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moeify.build import CARRIED_FILES
from moeify.checkpoint.atomic import atomic_directory, check_output_dir
from moeify.checkpoint.writer import ShardedWriter
from moeify.errors import MoeifyError
from moeify.modeling.hf import output_architecture_of, stock_state_dict
from moeify.modeling.load import MANIFEST, load_moe_model, read_manifest

TOLERANCE = 1e-4


def export_model(source: Path, out: Path, force: bool = False) -> tuple[Path, float]:
    """The exported directory and the max |logit difference| between it (stock) and moeify's model."""
    check_output_dir(out, force)
    manifest = read_manifest(source)
    gate = manifest.get("router", {}).get("gate", "linear")
    if gate != "linear":
        raise MoeifyError(
            f"cannot export {source}: its router is moeify's {gate} gate (Linear-tanh-Linear), which no stock transformers "
            "architecture represents; it stays in moeify's format (moeify train/eval/generate load it), or rebuild with --gate linear"
        )
    model, blocks = load_moe_model(source)
    if not blocks:
        raise MoeifyError(f"{source} is a dense model; there is nothing to export (build an MoE first)")
    arch = output_architecture_of(model.config)
    tensors = stock_state_dict(model.state_dict(), model.config)
    with atomic_directory(out, force) as tmp:
        writer = ShardedWriter(tmp)
        for name in sorted(tensors):
            writer.add(name, tensors[name])
        writer.close()
        model.config.save_pretrained(tmp)
        for file in sorted(source.iterdir()):
            if file.is_file() and CARRIED_FILES.match(file.name):
                shutil.copyfile(file, tmp / file.name)
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "format": arch.name, "exported_from": str(source)}, indent=2) + "\n")
        diff = _logit_difference(model, tmp)
        if diff > TOLERANCE:
            raise MoeifyError(f"the exported {arch.architecture} differs from moeify's model (max |logit diff| {diff:.2e}); nothing written")
    return out, diff


@torch.no_grad()
def _logit_difference(model: torch.nn.Module, exported: Path) -> float:
    ids = torch.randint(model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    stock = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    return (model.eval()(ids).logits - stock(ids).logits).abs().max().item()
