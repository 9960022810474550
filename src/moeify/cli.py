"""Command line: argument parsing and friendly errors over the library functions."""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from moeify.errors import MoeifyError


def _add_routing(parser: argparse.ArgumentParser, default: int | None = 8, default_k: int | None = 2) -> None:
    parser.add_argument("--experts", type=int, default=default, help="number of experts E (default 8)")
    parser.add_argument("--top-k", type=int, default=default_k, help="experts per token k (default 2)")


# Dataclass fields whose flag is spelled differently.
FLAG_NAMES = {"num_experts": "experts"}
# BuildConfig fields that are not construction settings (and so not flags of split/compare-init, nor recipe keys).
BUILD_ONLY = {"model", "out", "max_shard_bytes", "force"}


def _field_docs(schema) -> dict[str, str]:
    """The string literal under each field of a dataclass (and its bases), as written in the source."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for cls in reversed(schema.__mro__[:-1]):
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _add_dataclass_flags(parser: argparse.ArgumentParser, schema, skip: set[str] = frozenset()) -> None:
    """One flag per dataclass field; defaults are None so that only given flags override a recipe."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    docs = _field_docs(schema)
    for f in dataclasses.fields(schema):
        if f.name in skip:
            continue
        flag = "--" + FLAG_NAMES.get(f.name, f.name).replace("_", "-")
        kind = hints[f.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        base = inner[0] if inner else kind
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, dest=f.name, default=None,
                                help=f"{docs.get(f.name, '')} (default {f.default})".strip())
        else:
            parser.add_argument(flag, type=Path if base is Path else base, dest=f.name, default=None,
                                help=f"{docs.get(f.name, '')} (default {f.default})".strip())


def _parser() -> argparse.ArgumentParser:
    from moeify.build import BuildConfig
    from moeify.checkpoint.resolve import DEFAULT_MODEL
    from moeify.construct import METHODS, MethodOptions

    parser = argparse.ArgumentParser(prog="moeify", description="Turn a dense LLaMA-family model into an MoE model.")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="describe a dense model and the MoE each method would make")
    inspect.add_argument("model", help=f"HF directory, .gguf file or embedded name (e.g. {DEFAULT_MODEL})")
    _add_routing(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")

    build = commands.add_parser("build", help="build an MoE checkpoint from a dense model")
    build.add_argument("--model", required=True, help=f"HF directory, .gguf file or embedded name (e.g. {DEFAULT_MODEL})")
    build.add_argument("--recipe", type=Path, default=None, help="YAML recipe (its build: section); flags override it")
    build.add_argument("--out", required=True, type=Path, help="output directory")
    _add_dataclass_flags(build, BuildConfig, BUILD_ONLY)
    build.add_argument("--max-shard-mb", type=int, default=1024, help="safetensors shard size (MiB)")
    build.add_argument("--force", action="store_true", help="replace --out if it exists")

    split = commands.add_parser("split", help=f"write a partition file (methods: {', '.join(METHODS)})")
    split.add_argument("model", help=f"HF directory, .gguf file or embedded name (e.g. {DEFAULT_MODEL})")
    split.add_argument("--out", required=True, type=Path, help="partition file to write (.safetensors)")
    _add_dataclass_flags(split, MethodOptions)

    export = commands.add_parser("export", help="write a built or trained MoE as a stock transformers checkpoint (verified)")
    export.add_argument("model", help="MoE directory or training run")
    export.add_argument("--out", required=True, type=Path)
    export.add_argument("--force", action="store_true", help="replace --out if it exists")

    compare = commands.add_parser("compare-init", help="held-out perplexity of each construction method, untrained")
    compare.add_argument("model", help=f"dense model (e.g. {DEFAULT_MODEL})")
    compare.add_argument("--methods", default=None, help="comma-separated methods (default: the LLaMA-MoE set and upcycle)")
    compare.add_argument("--out", type=Path, default=Path("moeify-compare-init"), help="table, JSON and PNG go here")
    compare.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored per model")
    compare.add_argument("--force", action="store_true", help="replace --out if it exists")
    _add_dataclass_flags(compare, BuildConfig, BUILD_ONLY | {"method", "partition"})

    experiment = commands.add_parser("experiment", help="run a paper comparison (experiments/NAME.yaml): every arm, same budget and seed")
    experiment.add_argument("name", help="construction | scale | sampling | upcycle-vs-dense | capacity, or a .yaml path")
    experiment.add_argument("--model", default=None, help="override the experiment's model")
    experiment.add_argument("--max-tokens", type=int, default=None, help="override every arm's token budget")
    experiment.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per domain in the final evaluation")
    experiment.add_argument("--out", type=Path, default=None, help="default: moeify-experiments/NAME")
    experiment.add_argument("--force", action="store_true", help="replace --out if it exists")
    experiment.add_argument("--data", default=None, help="prepared data (moeify data prepare); default: the embedded corpus")

    quick = commands.add_parser("quickstart", help="build, reload and compare upcycled and random-split MoEs")
    quick.add_argument("--model", default=DEFAULT_MODEL)
    quick.add_argument("--work-dir", type=Path, default=None, help="where the MoE checkpoints go (default: cache)")
    quick.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens to score")
    quick.add_argument("--train-tokens", type=int, default=32_768,
                       help="continual pre-training budget for the random-split model; 0 skips it (default ~3 min on 2 cores)")
    _add_routing(quick)

    data = commands.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="tokenise and pack corpora per domain (default: the embedded corpus)")
    prep.add_argument("--model", default=DEFAULT_MODEL, help="model whose tokenizer is used")
    prep.add_argument("--source", action="append", default=[], metavar="DOMAIN=PATH",
                      help="text file/folder, .jsonl, .parquet or saved HF dataset; repeat per domain")
    prep.add_argument("--out", type=Path, default=None, help="output directory (default: cache)")
    prep.add_argument("--seq-len", type=int, default=512)

    evaluate = commands.add_parser("eval", help="per-domain loss, perplexity, bits per byte and routing of models side by side")
    evaluate.add_argument("models", nargs="+", help="models (directories, runs, .gguf, embedded names); the first is the baseline")
    evaluate.add_argument("--source", "--data", dest="source", action="append", default=[], metavar="DOMAIN=PATH",
                          help="evaluation text per domain (default: the embedded corpus's held-out documents)")
    evaluate.add_argument("--out", type=Path, default=Path("moeify-eval"), help="where eval.json/csv and plots go")
    evaluate.add_argument("--seq-len", type=int, default=512)
    evaluate.add_argument("--max-tokens", type=int, default=8192, help="predicted tokens per domain and model")
    evaluate.add_argument("--force", action="store_true", help="replace --out if it exists")
    evaluate.add_argument("--lm-eval", default=None, metavar="TASKS", help="also run lm-evaluation-harness tasks (comma-separated)")
    evaluate.add_argument("--lm-eval-include", type=Path, default=None, help="folder of extra lm-eval task YAMLs")
    evaluate.add_argument("--lm-eval-limit", type=int, default=None, help="examples per task")

    report = commands.add_parser("report", help="HTML report of a training run (and its evaluations)")
    report.add_argument("run", type=Path, help="a `moeify train` --out directory")
    report.add_argument("--eval", type=Path, action="append", default=None, help="eval output folder(s) to include")

    gen = commands.add_parser("generate", help="greedy completion of a prompt")
    gen.add_argument("model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--no-chat", action="store_true", help="ignore the tokenizer's chat template")

    from moeify.train.config import TrainConfig

    train = commands.add_parser("train", help="continual pre-training (run under torchrun for several ranks)")
    train.add_argument("--recipe", type=Path, default=None, help="YAML recipe (its train: section); flags override it")
    train.add_argument("--stop-after-steps", type=int, default=None, help="stop this call early, checkpointed")
    _add_dataclass_flags(train, TrainConfig)
    return parser


def _given(args: argparse.Namespace, schema, skip: set[str] = frozenset()) -> dict:
    import dataclasses

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(schema)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def _build_settings(args: argparse.Namespace) -> dict:
    """Construction settings: the recipe's build: section (if any), overridden by the given flags."""
    from moeify.build import BuildConfig
    from moeify.train.config import load_recipe

    settings = load_recipe(args.recipe, "build") if getattr(args, "recipe", None) else {}
    allowed = {f.name for f in __import__("dataclasses").fields(BuildConfig)} - BUILD_ONLY
    if set(settings) - allowed:
        raise MoeifyError(f"unknown build option(s) in recipe: {', '.join(sorted(set(settings) - allowed))}")
    settings.update(_given(args, BuildConfig, BUILD_ONLY))
    if "partition" in settings:
        settings["partition"] = Path(settings["partition"])
    return settings


def _run(args: argparse.Namespace) -> None:
    if args.command == "inspect":
        from moeify.inspect_model import format_inspection, inspect_model

        report = inspect_model(args.model, args.experts, args.top_k)
        print(json.dumps(asdict(report), indent=2) if args.json else format_inspection(report))
    elif args.command == "build":
        from moeify.build import BuildConfig, build

        if args.max_shard_mb < 1:
            raise MoeifyError(f"--max-shard-mb must be at least 1, got {args.max_shard_mb}")
        settings = _build_settings(args)
        config = BuildConfig(model=args.model, out=args.out, max_shard_bytes=args.max_shard_mb << 20, force=args.force, **settings)
        print(f"wrote {build(config)}")
    elif args.command == "split":
        from moeify.checkpoint.dense import DenseCheckpoint
        from moeify.checkpoint.resolve import resolve_model
        from moeify.construct import ConstructionPlan, MethodOptions

        options = MethodOptions(**_given(args, MethodOptions))
        if args.out.exists() and args.out.is_dir():
            raise MoeifyError(f"--out {args.out} is a directory; give a file name such as {args.out / 'partition.safetensors'}")
        partition = ConstructionPlan.make_partition(DenseCheckpoint(resolve_model(args.model)), options)
        partition.save(args.out)
        print(f"{partition.method}: {partition.num_layers} layers, {partition.num_experts} experts of {partition.expert_size} neurons"
              + (f", shared expert of {partition.shared_size}" if partition.shared_size else ""))
        print(f"wrote {args.out}")
    elif args.command == "export":
        from moeify.checkpoint.export import export_model
        from moeify.evaluate.models import check_model

        out, diff = export_model(check_model(args.model), args.out, args.force)
        print(f"wrote {out} (stock reload: max |logit diff| {diff:.1e})")
    elif args.command == "compare-init":
        from moeify.build import BuildConfig
        from moeify.compare_init import DEFAULT_METHODS, CompareInitConfig, compare_init, format_table

        settings = {"calibration": "embedded", **_build_settings(args)}
        methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(DEFAULT_METHODS)
        config = CompareInitConfig(args.model, args.out, methods, BuildConfig(model=args.model, out=args.out, **settings),
                                   eval_tokens=args.eval_tokens, force=args.force)
        print(format_table(compare_init(config)))
        print(f"wrote {args.out}")
    elif args.command == "experiment":
        from moeify.experiment import ExperimentConfig, format_results, run_experiment

        out = args.out or Path("moeify-experiments") / Path(args.name).stem
        result = run_experiment(ExperimentConfig(args.name, out, args.model, args.max_tokens, args.eval_tokens, args.force, args.data))
        print(format_results(result))
        print(f"wrote {out}")
    elif args.command == "quickstart":
        from moeify.quickstart import QuickstartConfig, format_rows, quickstart

        config = QuickstartConfig(model=args.model, num_experts=args.experts, top_k=args.top_k, eval_tokens=args.eval_tokens,
                                  train_tokens=args.train_tokens)
        config.split_scale = args.experts / args.top_k
        if args.work_dir is not None:
            config.work_dir = args.work_dir
        print(format_rows(quickstart(config), config.prompt))
    elif args.command == "data":
        from moeify.data.prepare import PrepareConfig, prepare

        dataset = prepare(PrepareConfig(model=args.model, sources=args.source, out=args.out, seq_len=args.seq_len))
        for domain in dataset.domains:
            info = dataset.meta["domains"][domain]
            print(f"{domain:<16} {info['documents']:>7} docs {info['train_tokens']:>11} train tokens {info['val_tokens']:>9} held-out")
        print(f"wrote {dataset.path}")
    elif args.command == "eval":
        from moeify.evaluate.lm_eval_bridge import run_lm_eval
        from moeify.evaluate.run import EvalConfig, evaluate, format_report

        report = evaluate(EvalConfig(args.models, args.out, args.source, args.seq_len, args.max_tokens, force=args.force))
        print(format_report(report))
        if args.lm_eval:
            tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
            scores = {m: run_lm_eval(m, tasks, args.lm_eval_include, args.lm_eval_limit) for m in args.models}
            (args.out / "lm_eval.json").write_text(json.dumps(scores, indent=2) + "\n")
            for model, tasks_scores in scores.items():
                for task, metrics in tasks_scores.items():
                    print(f"lm-eval {task:<20} {model}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        print(f"wrote {args.out}")
    elif args.command == "report":
        from moeify.evaluate.report import build_report

        print(f"wrote {build_report(args.run, args.eval)}")
    elif args.command == "generate":
        from moeify.evaluate.generate import generate

        print(generate(args.model, args.prompt, args.max_new_tokens, chat=not args.no_chat))
    elif args.command == "train":
        import dataclasses

        from moeify.train.config import TrainConfig, load_recipe, make_config
        from moeify.train.loop import train

        recipe = load_recipe(args.recipe) if args.recipe else {}
        overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
        result = train(make_config(recipe, overrides), stop_after_steps=args.stop_after_steps)
        if not result.is_main:
            pass
        elif not result.finished:
            print(f"stopped at step {result.steps}; continue with --resume --out {result.out}")
        else:
            where = result.model_dir or f"{result.out / 'checkpoints'} (not exported)"
            print(f"trained {result.steps} steps; model: {where}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except MoeifyError as error:
        print(f"moeify: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeify: interrupted", file=sys.stderr)
        return 130
    return 0
