import torch

from moeify.construct.seeding import ROUTER_STREAM, layer_generator


def expert_weights(
    gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, neurons: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's (gate, up, down) from the dense FFN; the output scale is folded into down.

    An expert that holds every neuron in order with scale 1 (upcycling) is the dense FFN itself:
    the tensors are returned as they are, not copied."""
    if scale == 1.0 and neurons.numel() == gate_FD.shape[0] and torch.equal(neurons, torch.arange(gate_FD.shape[0])):
        return gate_FD, up_FD, down_DF
    down = down_DF[:, neurons]
    if scale != 1.0:
        down = down * scale
    return gate_FD[neurons].contiguous(), up_FD[neurons].contiguous(), down.contiguous()


def init_router(num_experts: int, hidden_size: int, std: float, seed: int, layer: int, dtype: torch.dtype) -> torch.Tensor:
    """Router weight [E, D] drawn from N(0, std) (zeros when std is 0: uniform routing at start)."""
    if std == 0:
        return torch.zeros(num_experts, hidden_size, dtype=dtype)
    generator = layer_generator(seed, layer, ROUTER_STREAM)
    return (torch.randn(num_experts, hidden_size, generator=generator) * std).to(dtype)
