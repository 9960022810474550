import numpy as np
import torch

# Independent random streams per (seed, layer, purpose), so any layer can be built alone
# (by one rank of a distributed job, say) and still get the same numbers as a full build.
PARTITION_STREAM = 0
ROUTER_STREAM = 1
MLP_GATE_STREAM = 2
_EXPERT_STREAMS = 1000  # per-expert streams (re-initialisation, noise) start here


def layer_generator(seed: int, layer: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, layer, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def expert_generator(seed: int, layer: int, expert: int) -> torch.Generator:
    return layer_generator(seed, layer, _EXPERT_STREAMS + expert)
