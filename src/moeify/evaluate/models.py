"""Loading any dense or MoE checkpoint (stock HF, moeify build output, a training run) for evaluation."""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from moeify.checkpoint.resolve import resolve_model
from moeify.errors import MoeifyError
from moeify.modeling.load import load_moe_model


def resolve_eval_model(spec: str) -> Path:
    """Like resolve_model, and a training run directory stands for its exported model."""
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        return path / "model"
    return resolve_model(spec)


def check_model(spec: str) -> Path:
    """The model directory for `spec`, or a one-line error if it is not one."""
    path = resolve_eval_model(spec)
    if not (path / "config.json").is_file():
        raise MoeifyError(f"{spec} is not a model: {path} has no config.json (give a model directory, a training run or a .gguf)")
    return path


def read_paths(spec: str) -> list[Path]:
    """What loading `spec` reads: the model directory, and the .gguf file(s) it is converted from."""
    path = Path(spec).expanduser()
    reads = [check_model(spec)]
    if path.is_file():
        reads.append(path)
    elif path.is_dir() and not (path / "config.json").exists():
        reads += sorted(path.glob("*.gguf"))
    return reads


def load_for_eval(spec: str, device: torch.device | str = "cpu"):
    """(path, model, tokenizer, MoE blocks): the model in eval mode with moeify's blocks attached."""
    path = check_model(spec)
    try:
        AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, blocks = load_moe_model(path, device)
    except (OSError, ValueError, KeyError) as error:
        raise MoeifyError(f"cannot load {spec} as a causal LM with transformers: {str(error).strip().splitlines()[0]}") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # its ids would index past the embedding table
        raise MoeifyError(f"{spec}'s tokenizer has {len(tokenizer)} tokens, more than the model's {rows} embeddings: it belongs to "
                          "another model; put the model's own tokenizer files beside it")
    return path, model.eval(), tokenizer, blocks
