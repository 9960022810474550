"""Counting the collectives a training step issues (`moeify train --count-collectives`).

Every collective reaches the dispatcher as an operator: `c10d::` for torch.distributed's (FSDP2's all-gathers
and reduce-scatters, DDP's and HSDP's all-reduces, moeify's statistics), `_c10d_functional::` for the functional
ones (expert parallelism's all-to-alls, the balance losses' all-reduce); a dispatch mode sees each one on this
rank with its process group. A call's bytes are those of its whole
buffer: the gathered output of an all-gather, the input of a reduce-scatter, the tensor of an all-reduce,
the input of an all-to-all.
"""

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = {"_allgather_base_": "all_gather", "allgather_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
         "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
         "reduce_scatter_tensor_coalesced_": "reduce_scatter", "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce",
         "alltoall_base_": "all_to_all", "alltoall_": "all_to_all", "broadcast_": "broadcast", "barrier": "barrier",
         "all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter", "all_reduce": "all_reduce",
         "all_to_all_single": "all_to_all", "broadcast": "broadcast"}
NAMESPACES = ("c10d::", "_c10d_functional::")  # not _c10d_functional_autograd::, which runs _c10d_functional's


def _tensors(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class CollectiveCounter(TorchDispatchMode):
    """Calls and bytes per (kind, group): `counts[kind][group] = [calls, bytes]`, the group named by its ranks."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, dict[str, list[int]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        namespace, _, name = schema.name.partition("::")
        if namespace + "::" in NAMESPACES and name in KINDS:
            values = dict(zip([argument.name for argument in schema.arguments], args)) | (kwargs or {})
            if "process_group" in values:
                group = dist.ProcessGroup.unbox(values["process_group"])
            else:
                group = dist.distributed_c10d._resolve_process_group(values["group_name"])
            ranks = ",".join(map(str, dist.get_process_group_ranks(group)))
            size = max((t.numel() * t.element_size() for t in _tensors(args)), default=0)
            entry = self.counts.setdefault(KINDS[name], {}).setdefault(ranks, [0, 0])
            entry[0] += 1
            entry[1] += size
        return func(*args, **(kwargs or {}))
