"""Write the trained model in the stock transformers format its input had."""

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from moeify.checkpoint.manifest import Manifest
from moeify.checkpoint.writer import write_checkpoint
from moeify.modeling.hf import fold_scale, stock_state_dict
from moeify.train.distributed import DistEnv, barrier


def export_stock(model: torch.nn.Module, config, source_dir: Path, out: Path, env: DistEnv, manifest: Manifest | None,
                 training: dict) -> Path:
    """Gather the full state dict (a collective under FSDP2) and write it on rank 0.

    Tokenizer and generation files come from `source_dir`; the manifest (MoE models) gains `training`.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        if manifest is not None and manifest.scale_placement == "multiplier":
            state = fold_scale(state, manifest.scale)
        tensors = stock_state_dict(state, config)
        manifest = manifest.replace(training=training) if manifest is not None else None
        write_checkpoint(out, sorted(tensors.items()), config, source_dir, manifest, force=True, verb="train")
    barrier(env)
    return out
