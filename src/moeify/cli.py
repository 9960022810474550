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


def _add_dataclass_flags(parser: argparse.ArgumentParser, schema) -> None:
    """One flag per dataclass field; defaults are None so that only given flags override a recipe."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        base = inner[0] if inner else kind
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {f.default})")
        else:
            parser.add_argument(flag, type=base, default=None, help=f"(default {f.default})")


def _parser() -> argparse.ArgumentParser:
    from moeify.checkpoint.resolve import DEFAULT_MODEL
    from moeify.construct import METHODS

    parser = argparse.ArgumentParser(prog="moeify", description="Turn a dense LLaMA-family model into an MoE model.")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="describe a dense model and the MoE each method would make")
    inspect.add_argument("model", help=f"HF directory, .gguf file or embedded name (e.g. {DEFAULT_MODEL})")
    _add_routing(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")

    build = commands.add_parser("build", help="build an MoE checkpoint from a dense model")
    build.add_argument("--model", required=True, help=f"HF directory, .gguf file or embedded name (e.g. {DEFAULT_MODEL})")
    build.add_argument("--recipe", type=Path, default=None, help="YAML recipe (its build: section); flags override it")
    build.add_argument("--method", default=None, choices=list(METHODS), help="construction method (default upcycle)")
    _add_routing(build, None, None)
    build.add_argument("--out", required=True, type=Path, help="output directory")
    build.add_argument("--seed", type=int, default=None, help="(default 0)")
    build.add_argument("--router-std", type=float, default=None, help="router init N(0, std), default 0.02; 0 for zeros")
    build.add_argument("--scale", type=float, default=None, help="expert output scale (default: E/k for splits, 1 for upcycle)")
    build.add_argument("--max-shard-mb", type=int, default=1024, help="safetensors shard size (MiB)")
    build.add_argument("--force", action="store_true", help="replace --out if it exists")

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


def _run(args: argparse.Namespace) -> None:
    if args.command == "inspect":
        from moeify.inspect_model import format_inspection, inspect_model

        report = inspect_model(args.model, args.experts, args.top_k)
        print(json.dumps(asdict(report), indent=2) if args.json else format_inspection(report))
    elif args.command == "build":
        from moeify.build import BuildConfig, build
        from moeify.train.config import load_recipe

        if args.max_shard_mb < 1:
            raise MoeifyError(f"--max-shard-mb must be at least 1, got {args.max_shard_mb}")
        settings = load_recipe(args.recipe, "build") if args.recipe else {}
        allowed = {"method", "num_experts", "top_k", "seed", "router_std", "scale"}
        if set(settings) - allowed:
            raise MoeifyError(f"unknown build option(s) in recipe: {', '.join(sorted(set(settings) - allowed))}")
        flags = {"method": args.method, "num_experts": args.experts, "top_k": args.top_k, "seed": args.seed,
                 "router_std": args.router_std, "scale": args.scale}
        settings.update({k: v for k, v in flags.items() if v is not None})
        config = BuildConfig(model=args.model, out=args.out, max_shard_bytes=args.max_shard_mb << 20, force=args.force, **settings)
        print(f"wrote {build(config)}")
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
