"""Command line: a table of verbs, each a typed library function of one config dataclass.

Flags are generated from the dataclass fields (their docstrings are the help); a recipe's section,
where the verb takes one, gives values that flags override; types are checked by moeify.schema.
"""

import argparse
import dataclasses
import signal
import sys
import threading
import typing
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from moeify import __version__
from moeify.checkpoint.atomic import also_reading
from moeify.errors import (
    MoeifyError,
    describe_os_error,
    describe_out_of_memory,
    left_to_another_rank,
    same_on_every_local_rank,
)
from moeify.schema import COMMAND_LINE, base_type, check_values, from_flat, leaves


@dataclass(frozen=True)
class Verb:
    name: str
    """`data prepare` for a verb with a sub-verb."""
    help: str
    schema: str
    """module:Class of the config dataclass."""
    run: str
    """module:function taking the config and returning the text to print."""
    positional: tuple[str, ...] = ()
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    skip: frozenset[str] = frozenset()
    recipe: str | None = None
    """The recipe section (build or train) whose keys are defaults for the flags."""
    output: str | None = None
    """The leaf naming what the verb writes; it goes through the one output rule (checkpoint/atomic.py)."""
    stage: str = "start"
    """The heading `moeify --help` lists the verb under (STAGES, in the order a user walks them)."""


MODEL_ALIAS = {"model": ("--model",), "num_experts": ("--experts",)}
CONSTRUCTION_ONLY = frozenset({"method", "partition"})
STAGES = {
    "start": "start here",
    "construct": "make an MoE from a dense model",
    "train": "train it (continual pre-training, distillation)",
    "evaluate": "measure it",
    "ship": "ship it",
    "plan": "plan a cluster job",
}
VERBS = [
    Verb("quickstart", "the main job: upcycled, carved and split MoEs of one model, trained briefly and compared", "moeify.quickstart:QuickstartConfig",
         "moeify.quickstart:run_quickstart", ("model",), MODEL_ALIAS, output="work_dir"),
    Verb("inspect", "describe a dense model and the MoE each method would make", "moeify.inspect_model:InspectConfig",
         "moeify.inspect_model:run_inspect", ("model",), MODEL_ALIAS, stage="construct"),
    Verb("build", "build an MoE checkpoint from a dense model", "moeify.build:BuildConfig", "moeify.build:run_build",
         ("model",), MODEL_ALIAS, recipe="build", output="out", stage="construct"),
    Verb("split", "write a partition file (the experts' neurons) for build --partition", "moeify.split:SplitConfig", "moeify.split:run_split",
         ("model",), MODEL_ALIAS, recipe="build", output="out", stage="construct"),
    Verb("compare-init", "held-out perplexity of each construction method, untrained", "moeify.compare_init:CompareInitConfig",
         "moeify.compare_init:run_compare_init", ("model",), MODEL_ALIAS, CONSTRUCTION_ONLY, recipe="build", output="out",
         stage="construct"),
    Verb("data prepare", "tokenise and pack corpora per domain (default: the embedded corpus)", "moeify.data.prepare:PrepareConfig",
         "moeify.data.prepare:run_prepare", ("model",), {**MODEL_ALIAS, "sources": ("--source",)}, output="out", stage="train"),
    Verb("train", "continual pre-training or distillation (torchrun for several ranks)", "moeify.train.command:TrainCommand",
         "moeify.train.command:run_train", ("model",), MODEL_ALIAS, recipe="train", output="out", stage="train"),
    Verb("eval", "per-domain loss, perplexity, bits per byte and routing of models side by side", "moeify.evaluate.run:EvalConfig",
         "moeify.evaluate.run:run_eval", ("models",), {"sources": ("--source", "--data")}, output="out", stage="evaluate"),
    Verb("report", "HTML report of a training run (and its evaluations)", "moeify.evaluate.report:ReportConfig",
         "moeify.evaluate.report:run_report", ("run",), {"evals": ("--eval",)}, output="out", stage="evaluate"),
    Verb("generate", "greedy completion of a prompt", "moeify.evaluate.generate:GenerateConfig", "moeify.evaluate.generate:run_generate",
         ("model",), MODEL_ALIAS, stage="evaluate"),
    Verb("experiment", "run a paper comparison (construction, scale, sampling, distill, refit, ...): every arm, same budget and seed",
         "moeify.experiment:ExperimentConfig", "moeify.experiment:run_experiment_command", ("spec",), output="out", stage="evaluate"),
    Verb("export", "write a built or trained MoE as a stock transformers checkpoint (verified)", "moeify.checkpoint.export:ExportConfig",
         "moeify.checkpoint.export:run_export", ("model",), MODEL_ALIAS, output="out", stage="ship"),
    Verb("plan-memory", "per-GPU memory, collectives and step time of a training layout (GPUs, --ep, --hsdp)", "moeify.plan_memory:PlanMemoryConfig",
         "moeify.plan_memory:run_plan_memory", ("model",), MODEL_ALIAS, stage="plan"),
]


def _load(reference: str) -> Any:
    module, _, name = reference.partition(":")
    return getattr(import_module(module), name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_flags(parser: argparse.ArgumentParser, verb: Verb, schema: type) -> None:
    if verb.recipe:
        parser.add_argument("--recipe", type=Path, default=None, help=f"YAML recipe (its {verb.recipe}: section); flags override it")
    for leaf in leaves(schema):
        if leaf.name in verb.skip:
            continue
        kind = base_type(leaf.kind)
        default = "" if leaf.default is dataclasses.MISSING else f" (default {leaf.default})"
        help_text = f"{leaf.doc}{default}".strip().replace("%", "%%")
        is_list = typing.get_origin(kind) is list
        element = typing.get_args(kind)[0] if is_list else kind
        converter = element if element in (int, float) else str  # paths stay text until the schema checks them (Path("") is ".")
        choices = typing.get_args(element) if typing.get_origin(element) is typing.Literal else None
        if leaf.name in verb.positional:
            optional_here = leaf.default is not dataclasses.MISSING or leaf.name in verb.aliases  # MODEL or --model
            nargs = ("*" if optional_here else "+") if is_list else ("?" if optional_here else None)
            parser.add_argument(leaf.name, nargs=nargs, type=converter, default=None, help=help_text, metavar=leaf.name.upper())
            for alias in verb.aliases.get(leaf.name, ()):
                parser.add_argument(alias, dest=f"{leaf.name}_flag", type=converter, default=None, metavar=leaf.name.upper(),
                                    help=f"same as {leaf.name.upper()}")
            continue
        flags = [_flag(leaf.name), *verb.aliases.get(leaf.name, ())]
        if element is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, dest=leaf.name, default=None, help=help_text)
        elif is_list:
            parser.add_argument(*flags, action="append", type=converter, dest=leaf.name, default=None, help=help_text)
        else:
            parser.add_argument(*flags, type=None if choices else converter, choices=choices, dest=leaf.name, default=None, help=help_text)


REPLACED_FLAGS = {  # flags that are gone, and what does their work now
    "--recovery-steps": "carve's router-only recovery is now layer-wise distillation of the built MoE: "
                        "`moeify train --model MOE --layerwise` (add --trainable router for the routers alone)",
    "--recovery-lr": "carve's router-only recovery is now layer-wise distillation of the built MoE: `moeify train --model MOE --layerwise --lr LR`",
}


class _Parser(argparse.ArgumentParser):
    """argparse's errors (an unknown flag, a value not among the choices) in moeify's one-line form."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            replaced = next((flag for flag in REPLACED_FLAGS if flag in message.split()), None)
            if replaced:
                message = f"{replaced} was removed: {REPLACED_FLAGS[replaced]}"
        error = same_on_every_local_rank(MoeifyError(f"{message}; `{self.prog} --help` lists what it takes"))
        _print_error(str(error), error)
        self.exit(2)


def parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the verb named in `argv` gets its flags (so only its module is imported)."""
    words = sys.argv[1:] if argv is None else argv
    root = _Parser(prog="moeify", description="Turn a dense LLaMA-family model into an MoE model.", epilog=_verbs_by_stage(),
                   formatter_class=argparse.RawDescriptionHelpFormatter, usage="moeify [--version] VERB ...")
    root.add_argument("--version", action="version", version=f"moeify {__version__}")
    commands = root.add_subparsers(dest="command", required=True, metavar="VERB", prog="moeify", help=argparse.SUPPRESS)
    groups: dict[str, argparse._SubParsersAction] = {}
    for verb in VERBS:
        head, _, sub = verb.name.partition(" ")
        if sub:
            if head not in groups:
                groups[head] = commands.add_parser(head).add_subparsers(dest="subcommand", required=True)
            verb_parser = groups[head].add_parser(sub, help=verb.help)
        else:
            verb_parser = commands.add_parser(head, description=verb.help)
        verb_parser.set_defaults(verb=verb)
        if head in words and (not sub or sub in words):
            _add_flags(verb_parser, verb, _load(verb.schema))
    return root


def _verbs_by_stage() -> str:
    lines = []
    for stage, heading in STAGES.items():
        lines.append(f"{heading}:")
        lines += [f"  {verb.name:<14}{verb.help}" for verb in VERBS if verb.stage == stage]
    return "verbs, in the order a user walks them (`moeify VERB --help` for each):\n" + "\n".join(lines) + \
        "\n\nThe manual: README.md and docs/ in the source tree."


def parse_command(argv: list[str]) -> tuple[Verb, Any]:
    """The verb and its config for a command line, checked as `main` checks them before running the verb
    (flags, recipe values, types and ranges); nothing is read but the recipe, nothing is run."""
    args = parser(argv).parse_args(argv)
    return args.verb, _config(args)


def _config(args: argparse.Namespace) -> Any:
    """The verb's config dataclass from its flags over its recipe, typed and range-checked."""
    schema = _load(args.verb.schema)
    return from_flat(schema, _values(args, args.verb, schema), COMMAND_LINE)


def _values(args: argparse.Namespace, verb: Verb, schema: type) -> dict:
    """The given flags (and positionals) by leaf name, over the recipe section's values."""
    from moeify.train.config import recipe_values

    values = recipe_values(args.recipe, verb.recipe) if verb.recipe and args.recipe else {}
    if values:  # a wrong recipe value is named as the recipe's; what is left wrong afterwards came from a flag
        check_values(schema, values, f"recipe {args.recipe} ({verb.recipe}:)")
    for leaf in leaves(schema):
        given = getattr(args, leaf.name, None)
        alias = getattr(args, f"{leaf.name}_flag", None)
        if given is not None and alias is not None and given != alias:
            raise MoeifyError(f"{leaf.name.upper()} is given twice ({given} and --{leaf.name} {alias}); give it once")
        value = given if given is not None else alias
        if value is not None:
            values[leaf.name] = value
    missing = [leaf.name for leaf in leaves(schema) if leaf.default is dataclasses.MISSING and leaf.name not in values]
    if missing:
        raise MoeifyError(f"{verb.name} needs {', '.join(n.upper() if n in verb.positional else _flag(n) for n in missing)}")
    return values


def _quiet_transformers() -> None:
    """transformers' own bars ("Loading weights", "Writing model shards") repeat for every small
    load; moeify shows its own progress for the long stages."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _print_error(message: str, error: BaseException) -> None:
    if not left_to_another_rank(error):
        print(f"moeify: error: {_one_line(message)}", file=sys.stderr)


def _one_line(message: str) -> str:
    """The message with what would break or hide the line (a newline or other control character in a value
    the user gave) written as its escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser(argv).parse_args(argv)
    except SystemExit as stop:  # --help, or a flag argparse refused (already printed in one line)
        return stop.code if isinstance(stop.code, int) else 2
    verb: Verb = args.verb
    _quiet_transformers()
    in_main_thread = threading.current_thread() is threading.main_thread()
    _sigterm_received.clear()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _run_verb(verb, args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job, `kill`): unwinds like Ctrl-C, so nothing half-written is left.
    `train` finishes its step and checkpoints instead (train/loop.py)."""


_sigterm_received = threading.Event()


def _terminate(signum, frame) -> None:
    _sigterm_received.set()
    raise Terminated()


def _run_verb(verb: "Verb", args: argparse.Namespace) -> int:
    try:
        try:
            config = _config(args)
        except MoeifyError as error:  # a bad flag or recipe value: alike on every rank of a node
            raise same_on_every_local_rank(error)
        with also_reading([getattr(args, "recipe", None)]):  # an output must not hold the recipe either
            text = _load(verb.run)(config)
        if text:
            print(text)
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 (what `_failed` cannot describe is raised again)
        return _failed(error)
    return 0


def _failed(error: BaseException) -> int:
    """Print `error` as one line and return the exit code; a bug (an exception nobody described) is raised again."""
    # SIGTERM's exception may surface as another one when it lands in a library's native code calling back into
    # Python (safetensors' get_tensor turned it into a ValueError): once SIGTERM came, any exception is the stop.
    if _sigterm_received.is_set():
        print("moeify: terminated", file=sys.stderr)
        return 143
    if isinstance(error, KeyboardInterrupt):
        print("moeify: interrupted", file=sys.stderr)
        return 130
    if isinstance(error, MoeifyError):
        _print_error(str(error), error)
        return 2
    if isinstance(error, OSError):  # no space, read-only, permission: nothing half-written is left (outputs are atomic)
        _print_error(describe_os_error(error), error)
        return 2
    if isinstance(error, (MemoryError, RuntimeError)) and (message := describe_out_of_memory(error)) is not None:
        _print_error(message, error)
        return 2
    raise error

