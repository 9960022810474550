"""Layer-wise distillation (`moeify train --layerwise`, LaDiMo's objective).

One forward of the frozen dense teacher records, at every layer, its FFN's input x (the hidden state
after the post-attention norm) and output y. Each MoE block of the student then runs on the teacher's
x alone, and its loss on a sequence is the relative squared error

    ||block(x) - y||^2 / ||y||^2   (sums over the sequence's positions and the hidden dimension),

averaged over the layers. The student's attention, embeddings and output projection never run, forward
or backward: a step costs one teacher forward plus the MoE blocks' forward and backward. With k = E and
experts covering every neuron the loss is the construction's reconstruction error, 0 for a split.
"""

import warnings

import torch
from torch import nn

from moeify.errors import MoeifyError
from moeify.modeling.hf import moe_layers
from moeify.train.teacher import Teacher


def check_teacher_layers(teacher: Teacher, student_config) -> None:
    """The teacher's layers must be the student's, one for one, with FFN inputs of the same width."""
    config = teacher.model.config
    if (config.num_hidden_layers, config.hidden_size) != (student_config.num_hidden_layers, student_config.hidden_size):
        raise MoeifyError(f"--layerwise: the teacher {teacher.path} has {config.num_hidden_layers} layers of width {config.hidden_size}, "
                          f"the student {student_config.num_hidden_layers} of width {student_config.hidden_size}; give the "
                          "dense model the MoE was built from as --teacher")


@torch.no_grad()
def teacher_ffn_io(teacher: Teacher, ids_BS: torch.Tensor, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> (FFN input, FFN output) of the teacher on `ids_BS`."""
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(index: int):
        def hook(module, args, output):
            recorded[index] = (args[0], output)
        return hook

    decoder = teacher.model.model.layers
    handles = [decoder[i].mlp.register_forward_hook(recorder(i)) for i in layers]
    try:
        teacher.model(input_ids=ids_BS, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def layerwise_errors(model: nn.Module, teacher: Teacher, ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, L]: each sequence's relative squared error at each MoE layer (with gradient)."""
    blocks = moe_layers(model)
    targets = teacher_ffn_io(teacher, ids_BS, list(blocks))
    errors = []
    for index, block in blocks.items():
        x_BSD, y_BSD = targets.pop(index)  # freed layer by layer once the block's graph holds what it needs
        y_BSD = y_BSD.float()
        with warnings.catch_warnings():  # FSDP2 warns of a view output for in-place use; it is only read here
            warnings.filterwarnings("ignore", message=".*returned a view tensor")
            out_BSD = block(x_BSD)
        residual_BSD = out_BSD.float() - y_BSD
        errors.append(residual_BSD.pow(2).sum((1, 2)) / y_BSD.pow(2).sum((1, 2)).clamp_min(1e-30))
    return torch.stack(errors, dim=1)
