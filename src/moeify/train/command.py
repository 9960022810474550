"""`moeify train` from the command line: the training settings, the construction settings that
--from-dense builds with (the recipe's build: section and the construction flags), and when to stop."""

from dataclasses import dataclass, field, replace

from moeify.construct import ConstructionConfig
from moeify.train.config import TrainConfig


@dataclass
class TrainCommand:
    train: TrainConfig = field(default_factory=TrainConfig)
    construction: ConstructionConfig = field(default_factory=ConstructionConfig, metadata={"skip": ("seed",)})
    """Online upcycling (--from-dense) constructs with the training --seed."""
    stop_after_steps: int | None = None
    """Stop this call early, checkpointed (0: checkpoint the initial weights); --resume continues."""


def run_train(command: TrainCommand) -> str | None:
    from moeify.train.distributed import shutdown_distributed
    from moeify.train.loop import train

    construction = replace(command.construction, seed=command.train.seed)
    try:
        result = train(command.train, construction, stop_after_steps=command.stop_after_steps)
    finally:
        shutdown_distributed()
    if not result.is_main:
        return None
    if not result.finished:
        return f"stopped at step {result.steps}; continue with --resume --out {result.out}"
    where = result.model_dir or f"{result.out / 'checkpoints'} (not exported)"
    return f"trained {result.steps} steps; model: {where}"
