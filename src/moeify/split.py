"""`moeify split`: write a partition file, the neurons of every expert (and shared block) of every layer."""

from dataclasses import dataclass, field
from pathlib import Path

from moeify.checkpoint.atomic import atomic_file, check_output
from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.resolve import resolve_model
from moeify.construct import ConstructionConfig, ConstructionPlan, Partition
from moeify.errors import MoeifyError


@dataclass
class SplitConfig:
    model: str
    """Dense model: a Hugging Face directory, a .gguf file, or an embedded name (smollm2-135m)."""
    out: Path
    """Partition file to write (.safetensors)."""
    construction: ConstructionConfig = field(default_factory=ConstructionConfig)
    force: bool = False
    """Replace --out if it is a partition file."""


def split(config: SplitConfig, progress: bool = True) -> Partition:
    out = Path(config.out)
    if out.is_dir():
        raise MoeifyError(f"--out {out} is a directory; give a file name such as {out / 'partition.safetensors'}")
    if config.construction.partition is not None:
        raise MoeifyError("--partition is the input of build; split makes a partition from --method and its options")
    if config.construction.refit:
        raise MoeifyError("--refit changes weights, not the partition: drop it here and give it to `moeify build --partition`")
    reads = [Path(config.model), *config.construction.read_paths()]
    check_output(out, config.force, reads, ours=Partition.is_partition_file)
    dense = DenseCheckpoint(resolve_model(config.model))
    reads.append(dense.path)
    partition = ConstructionPlan.make(dense, config.construction, config.model, progress).make_partition(dense)
    with atomic_file(out, config.force, reads, Partition.is_partition_file) as tmp:
        partition.save(tmp)
    return partition


def run_split(config: SplitConfig) -> str:
    partition = split(config)
    shared = f", shared expert of {partition.shared_size}" if partition.shared_size else ""
    return (f"{partition.method}: {partition.num_layers} layers, {partition.num_experts} experts of {partition.expert_size} neurons"
            f"{shared}\nwrote {config.out}")
