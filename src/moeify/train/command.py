"""`moeify train` from the command line: the training settings, the construction settings that
--from-dense builds with (the recipe's build: section and the construction flags), and when to stop."""

from dataclasses import dataclass, field
from typing import ClassVar

from moeify.construct import ConstructionConfig
from moeify.schema import at_least
from moeify.train.config import TrainConfig


@dataclass
class TrainCommand:
    RANGES: ClassVar[dict] = {"stop_after_steps": at_least(0)}
    train: TrainConfig = field(default_factory=TrainConfig)
    construction: ConstructionConfig = field(default_factory=ConstructionConfig, metadata={"skip": ("seed",)})
    """Online upcycling (--from-dense) constructs with the training --seed."""
    stop_after_steps: int | None = None
    """Stop this call early, checkpointed (0: checkpoint the initial weights); --resume continues."""


def run_train(command: TrainCommand) -> str | None:
    from moeify.train.distributed import shutdown_distributed
    from moeify.train.loop import train

    construction = command.construction
    construction.seed = command.train.seed  # in place: the record of which settings were given stays
    try:
        result = train(command.train, construction, stop_after_steps=command.stop_after_steps)
    except BaseException:
        shutdown_distributed(finished=False)
        raise
    shutdown_distributed()
    if not result.is_main:
        return None
    if result.stopped_by_signal:
        return f"stopped by SIGTERM after step {result.steps}, checkpointed; continue with --resume --out {result.out}"
    if not result.finished:
        return f"stopped at step {result.steps}; continue with --resume --out {result.out}"
    where = result.model_dir or f"{result.out / 'checkpoints'} (not exported)"
    return f"trained {result.steps} steps; model: {where}"
