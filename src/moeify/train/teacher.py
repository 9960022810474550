"""The dense parent as a distillation teacher (`moeify train --distill`).

Built like online upcycling: on the meta device, sharded with FSDP2 per decoder layer when the student
is (no optimizer state; parameters resharded after each layer's forward), then each rank allocates
and fills only its own shards from the checkpoint. Frozen, in eval mode, compiled with --compile. Its
output projection is replaced by the identity: the model returns its final hidden states, and the
student's chunked head turns them into logits one chunk at a time (modeling/chunked_loss.py), so the
teacher's [tokens x vocab] logits never exist whole. That projection is kept whole on every rank.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.manifest import Manifest
from moeify.checkpoint.resolve import resolve_model
from moeify.data.prepare import tokenizer_fingerprint
from moeify.errors import MoeifyError
from moeify.modeling.chunked_loss import DistillTargets, chunked_head
from moeify.train.distributed import DistEnv, compile_layers
from moeify.train.online import local_box
from moeify.train.parallelize import Layout, shard_frozen


@dataclass
class Teacher:
    model: nn.Module  # returns the final hidden states [B, S, D] as `.logits`
    head_VD: torch.Tensor
    path: Path


def teacher_path(teacher: str | None, model_dir: Path, manifest: Manifest | None, from_dense: bool, flag: str = "--distill") -> Path:
    """--teacher, or the dense model the MoE came from (the --from-dense model itself when built online)."""
    if teacher is not None:
        return resolve_model(teacher)
    if from_dense:
        return model_dir
    if manifest is None:
        raise MoeifyError(f"{flag}: {model_dir} has no moeify.json recording its dense parent; give --teacher PATH")
    if Path(manifest.source_path).is_dir():
        return Path(manifest.source_path)
    try:
        return resolve_model(manifest.source_model)
    except MoeifyError:
        raise MoeifyError(f"{flag}: the dense parent recorded in moeify.json ({manifest.source_path}) is gone; "
                          "give --teacher PATH") from None


def load_teacher(path: Path, env: DistEnv, layout: Layout, dtype: torch.dtype, vocab_size: int, data_tokenizer: str,
                 compile: bool = False, flag: str = "--distill") -> Teacher:
    dense = DenseCheckpoint(path)
    if int(dense.config.vocab_size) != vocab_size:
        raise MoeifyError(f"{flag}: the teacher {path} has a vocabulary of {dense.config.vocab_size} tokens, the student "
                          f"{vocab_size}; give a --teacher with the student's tokenizer")
    if tokenizer_fingerprint(path) != data_tokenizer:
        raise MoeifyError(f"{flag}: the teacher {path} has another tokenizer than the data and the student; give a "
                          "--teacher with the student's tokenizer")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(dense.config, dtype=torch.float32)
    model.lm_head = nn.Identity()
    model.requires_grad_(False)
    model = shard_frozen(model, env, layout, dtype)
    model.to_empty(device=env.device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local, box = local_box(param)
            if local.numel():
                local.copy_(dense.block(name, box))
    rotary = model.model.rotary_emb  # its inv_freq buffers are not saved, so recompute them
    model.model.rotary_emb = type(rotary)(config=model.config).to(env.device)
    if not env.distributed:
        model.to(dtype)  # sharded, FSDP2 gathers the parameters in the compute dtype instead
    if compile:
        compile_layers(model)
    if "lm_head.weight" in dense.tensor_names:
        head_VD = dense.get("lm_head.weight").to(env.device, dtype)
    else:  # tied: the embedding itself (never sharded, see shard_frozen), not a second copy
        head_VD = model.model.embed_tokens.weight
    return Teacher(model.eval(), head_VD, path)


def distill_losses(model: nn.Module, teacher: Teacher, ids_BS: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """Per sequence [B, 4]: the objective (1 - alpha) NLL + alpha tau^2 KL (with gradient, for a mean over
    sequences), the student's next-token NLL, KL(teacher || student) at `temperature`, the teacher's NLL."""
    with torch.no_grad():
        hidden_BSD = teacher.model(input_ids=ids_BS[:, :-1], use_cache=False).logits
    head = chunked_head(model)
    head.targets, head.distill = ids_BS[:, 1:], DistillTargets(hidden_BSD, teacher.head_VD, alpha, temperature)
    try:
        return model(input_ids=ids_BS[:, :-1], use_cache=False).logits.mean(dim=1)
    finally:
        head.targets, head.distill = None, None
