"""Write the trained model in the stock transformers format its input had."""

import json
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from moeify.build import MANIFEST, CARRIED_FILES
from moeify.checkpoint.atomic import atomic_directory
from moeify.checkpoint.writer import ShardedWriter
from moeify.modeling.hf import stock_state_dict
from moeify.train.distributed import DistEnv, barrier


def export_stock(model: torch.nn.Module, config, source_dir: Path, out: Path, env: DistEnv, manifest: dict) -> Path:
    """Gather the full state dict (a collective under FSDP2) and write it on rank 0.

    Tokenizer and generation files come from `source_dir`; `manifest` becomes moeify.json.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        tensors = stock_state_dict(state, config)
        with atomic_directory(out, force=True) as tmp:
            writer = ShardedWriter(tmp)
            for name in sorted(tensors):
                writer.add(name, tensors[name])
            writer.close()
            config.save_pretrained(tmp)
            for file in sorted(source_dir.iterdir()):
                if file.is_file() and CARRIED_FILES.match(file.name):
                    shutil.copyfile(file, tmp / file.name)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    barrier(env)
    return out
