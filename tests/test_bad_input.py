"""Bad input over every verb, as a table: exit code 2, one error line, no traceback, nothing half-written.

Read-only and full-disk targets are real: a read-only tmpfs and a 64 KiB tmpfs, mounted by the test
(the tests run as root, where a directory without write permission would not stop a write). Where
mounting is not allowed the test says so and simulates the OS error at the write calls instead
(`open` and `mkdir` under the target raise EROFS / ENOSPC).
"""

import builtins
import contextlib
import errno
import io
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from moeify.cli import main
from tests.conftest import error_lines

_MOUNTED: dict[str, str] = {}  # how each kind of target was made, for the record


@contextlib.contextmanager
def target(tmp_path: Path, kind: str, monkeypatch):
    """A directory that is read-only ("ro") or small enough to fill ("full": 64 KiB, "full-1m": 1 MiB)."""
    root = tmp_path / f"mnt-{kind}"
    root.mkdir()
    options = {"ro": "ro,size=64k", "full": "size=64k", "full-1m": "size=1m"}[kind]
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(root)], capture_output=True).returncode == 0
    _MOUNTED[kind] = "tmpfs mount" if mounted else "simulated OSError at open/mkdir"
    if not mounted:
        code = errno.EROFS if kind == "ro" else errno.ENOSPC
        real_open, real_mkdir = builtins.open, os.mkdir

        def refuse(path) -> None:
            if str(os.fspath(path)).startswith(str(root)):
                raise OSError(code, os.strerror(code), str(path))

        def fake_open(file, mode="r", *args, **kwargs):
            if any(flag in mode for flag in "wax+"):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            refuse(path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
    try:
        yield root
    finally:
        if mounted and subprocess.run(["umount", str(root)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(root)], capture_output=True)  # a file still open in it


@dataclass
class Case:
    name: str
    argv: Callable[[dict], list[str]]  # from the context: models, data, paths
    fragment: str  # what the one error line must say
    out: Callable[[dict], Path] | None = None  # what must not exist (or stay empty) afterwards
    mount: str | None = None  # "ro" | "full": ctx["mnt"] is such a directory
    keep: Callable[[dict], Path] | None = None  # the user's files that must be byte for byte as they were


def _recipe(ctx: dict, text: str) -> str:
    path = ctx["tmp"] / "recipe.yaml"
    path.write_text(text)
    return str(path)


def _experiment(ctx: dict, document) -> str:
    path = ctx["tmp"] / "experiment.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


def _file(ctx: dict, name: str, content: bytes) -> str:
    path = ctx["tmp"] / name
    path.write_bytes(content)
    return str(path)


def _stock_copy(ctx: dict) -> str:
    """The test MoE as a stock checkpoint: its files without moeify.json."""
    path = ctx["tmp"] / "stock-moe"
    shutil.copytree(ctx["moe"], path, ignore=shutil.ignore_patterns("moeify.json"), dirs_exist_ok=True)
    return str(path)


def _dir_with(ctx: dict, name: str, files: dict[str, str]) -> str:
    path = ctx["tmp"] / name
    path.mkdir(parents=True)
    for file, text in files.items():
        (path / file).write_text(text)
    return str(path)


NOT_UTF8_JSONL = b'{"text": "ok"}\n\xff\xfe\n'  # a second line that is not UTF-8


def _parquet_of_ints(ctx: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = ctx["tmp"] / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    return str(path)


def _tokenizer_too_large(ctx: dict) -> str:
    """A copy of the tiny Llama whose tokenizer has 50 more tokens than the model has embeddings."""
    from transformers import AutoTokenizer

    path = _copy(ctx, "llama", "big-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens([f"extra{i}" for i in range(50)])
    tokenizer.save_pretrained(path)
    return path


def _damaged_data(ctx: dict, damage: Callable[[Path], None]) -> str:
    """A copy of the context's prepared data with `damage` done to it."""
    path = ctx["tmp"] / "data"
    shutil.copytree(ctx["data"], path)
    damage(path)
    return str(path)


def _copy(ctx: dict, key: str, name: str) -> str:
    """A copy of a context model at tmp/NAME (the original is shared by every case)."""
    shutil.copytree(ctx[key], ctx["tmp"] / name)
    return str(ctx["tmp"] / name)


def _with_config(ctx: dict, name: str, **changes) -> str:
    """The tiny Llama with config.json changed (the weights as they are)."""
    path = Path(_copy(ctx, "llama", name))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return str(path)


def _tiny_llama(ctx: dict, name: str, **changes) -> str:
    from transformers import LlamaConfig

    from tests.conftest import COMMON, save_tiny

    return str(save_tiny(LlamaConfig(**{**COMMON, **changes}), ctx["tmp"] / name))


def _other_tokenizer(ctx: dict) -> str:
    path = Path(_copy(ctx, "llama", "other-tokenizer"))
    settings = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 7}))
    return str(path)


def _fifo(ctx: dict) -> str:
    path = ctx["tmp"] / "fifo"
    os.mkfifo(path)
    return str(path)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.is_dir() else \
        {path.name: path.read_bytes()}


L = lambda ctx: str(ctx["llama"])  # noqa: E731
OUT = lambda ctx: ctx["tmp"] / "out"  # noqa: E731
TRAIN = lambda ctx: ["train", str(ctx["moe"]), "--data", str(ctx["data"]), "--out", str(OUT(ctx)), "--batch-size", "8",  # noqa: E731
                     "--micro-batch", "4", "--max-tokens", "512", "--eval-blocks", "1", "--no-export"]
BUILD = lambda ctx, *flags: ["build", L(ctx), "--out", str(OUT(ctx)), *flags]  # noqa: E731

CASES = [
    # inspect
    Case("plan-missing-model", lambda c: ["plan-memory", str(c["tmp"] / "nope")], "no model at"),
    Case("plan-ep-not-dividing-ranks", lambda c: ["plan-memory", "llama-3-8b", "--gpus", "6", "--ep", "4"], "--ep 4 must divide the 6 ranks"),
    Case("plan-ep-not-dividing-experts", lambda c: ["plan-memory", "llama-3-8b", "--gpus", "12", "--ep", "3"], "--ep 3 must divide the 8 experts"),
    Case("plan-hsdp-not-dividing", lambda c: ["plan-memory", "llama-3-8b", "--gpus", "8", "--hsdp", "3"], "--hsdp 3 must divide the 8 ranks"),
    Case("plan-zero-gpus", lambda c: ["plan-memory", "llama-3-8b", "--gpus", "0"], "--gpus is 0; it must be at least 1"),
    Case("plan-batch-not-multiple", lambda c: ["plan-memory", "llama-3-8b", "--gpus", "8", "--batch-size", "12"],
         "--batch-size 12 must be a multiple of --micro-batch 1 x 8 GPUs"),
    Case("plan-ep-with-ddp", lambda c: ["plan-memory", "llama-3-8b", "--ep", "2", "--parallel", "ddp"], "use --parallel fsdp"),
    Case("inspect-missing", lambda c: ["inspect", str(c["tmp"] / "nope")], "no model at"),
    Case("inspect-zero-experts", lambda c: ["inspect", L(c), "--num-experts", "0"], "--num-experts is 0; it must be at least 1"),
    Case("inspect-k-above-E", lambda c: ["inspect", L(c), "--top-k", "9"], "larger than --num-experts 8"),
    Case("inspect-model-twice", lambda c: ["inspect", L(c), "--model", str(c["qwen2"])], "given twice"),
    Case("inspect-tiny-gguf", lambda c: ["inspect", _file(c, "bad.gguf", b"GGUF" + bytes(96))], "cannot load GGUF file"),
    Case("inspect-not-a-model", lambda c: ["inspect", _dir_with(c, "empty", {"x.txt": "hi"})], "has no config.json"),
    # build
    Case("build-not-divisible", lambda c: BUILD(c, "--method", "random-split", "--num-experts", "7"), "not divisible", OUT),
    Case("build-top-k-zero", lambda c: BUILD(c, "--top-k", "0"), "--top-k is 0; it must be at least 1", OUT),
    Case("build-carve-top-k-above-experts", lambda c: BUILD(c, "--method", "carve", "--num-experts", "4", "--top-k", "6", "--calibration",
                                                              "embedded"), "--top-k 6 is larger than --num-experts 4", OUT),
    Case("build-experts-beyond-memory", lambda c: BUILD(c, "--num-experts", str(10**10)), "out of memory (2560.0 GB asked)", OUT),
    Case("build-experts-beyond-int64", lambda c: BUILD(c, "--num-experts", str(10**21)), "it must be smaller than 2**63", OUT),
    Case("build-negative-seed", lambda c: BUILD(c, "--seed", "-1"), "--seed is -1; it must be in [0, 4294967295]", OUT),
    Case("build-negative-scale", lambda c: BUILD(c, "--scale", "-2"), "--scale is -2.0; it must be greater than 0", OUT),
    Case("build-negative-router-std", lambda c: BUILD(c, "--router-std", "-1"), "--router-std is -1.0; it must be at least 0", OUT),
    Case("build-megatron-scaling-on-a-split", lambda c: BUILD(c, "--method", "random-split", "--num-experts", "4", "--weight-scaling",
                                                          "megatron"), "--weight-scaling is read with --method upcycle, granular-upcycle, drop-upcycle, noise-upcycle or btx, not with --method random-split", OUT),
    Case("build-noise-fraction-zero", lambda c: BUILD(c, "--method", "noise-upcycle", "--noise-fraction", "0"), "--noise-fraction is 0.0", OUT),
    Case("build-drop-ratio-above-1", lambda c: BUILD(c, "--method", "drop-upcycle", "--drop-ratio", "1.5"), "in [0, 1]", OUT),
    Case("build-granularity-zero", lambda c: BUILD(c, "--granularity", "0"), "--granularity is 0", OUT),
    Case("build-unknown-method", lambda c: BUILD(c, "--method", "nope"), "unknown method 'nope'", OUT),
    Case("build-unknown-format", lambda c: BUILD(c, "--format", "nope"), "unknown format 'nope'", OUT),
    Case("build-format-cannot-hold", lambda c: BUILD(c, "--routing", "sigmoid-topk", "--format", "mixtral"), "Mixtral routes", OUT),
    Case("build-unsupported-dtype", lambda c: BUILD(c, "--dtype", "int8"), "argument --dtype: invalid choice: 'int8'", OUT),
    Case("build-btx-without-models", lambda c: BUILD(c, "--method", "btx"), "give --expert-model PATH once per expert", OUT),
    Case("build-btx-other-architecture", lambda c: BUILD(c, "--method", "btx", "--expert-model", L(c), "--expert-model", str(c["qwen2"])),
         "is not a fine-tune of MODEL: model_type is 'qwen2'", OUT),
    Case("build-btx-missing-model", lambda c: BUILD(c, "--method", "btx", "--expert-model", L(c), "--expert-model", str(c["tmp"] / "nope")), "no model at", OUT),
    Case("build-btx-count", lambda c: BUILD(c, "--method", "btx", "--expert-model", L(c), "--num-experts", "3"),
         "one expert per --expert-model: 1 given, --num-experts 3", OUT),
    Case("build-expert-model-without-btx", lambda c: BUILD(c, "--expert-model", L(c)), "--expert-model is read with --method btx, not with --method upcycle", OUT),
    Case("build-prompts-missing-file", lambda c: BUILD(c, "--expert-prompts", str(c["tmp"] / "nope.yaml")), "nope.yaml does not exist", OUT),
    Case("build-prompts-empty-file", lambda c: BUILD(c, "--expert-prompts", _file(c, "p.yaml", b"")), "holds no expert entries", OUT),
    Case("build-prompts-not-yaml", lambda c: BUILD(c, "--expert-prompts", _file(c, "p.yaml", b"- positive: [unclosed")), "is not valid YAML", OUT),
    Case("build-prompts-binary", lambda c: BUILD(c, "--expert-prompts", _file(c, "p.yaml", b"\x89PNG\r\n\x1a\n\xff\xfe")),
         "is not a text file (not UTF-8)", OUT),
    Case("build-prompts-count", lambda c: BUILD(c, "--expert-prompts", _file(c, "p.yaml", b"- positive: [a]\n")),
         "has 1 expert entries for 8 experts", OUT),
    Case("build-prompts-no-positive", lambda c: BUILD(c, "--num-experts", "2", "--expert-prompts",
                                                      _file(c, "p.yaml", b"- positive: [a]\n- negative: [b]\n")),
         "entry 1 has no positive prompts", OUT),
    Case("build-prompts-lone-surrogate", lambda c: BUILD(c, "--num-experts", "2", "--expert-prompts",
                                                         _file(c, "p.json", b'[{"positive": ["a \\ud800 b"]}, {"positive": ["c"]}]')),
         "half of a UTF-16 surrogate pair without its other half", OUT),
    Case("build-prompts-without-file", lambda c: BUILD(c, "--router-init", "prompts"), "needs --expert-prompts FILE", OUT),
    Case("build-prompts-with-other-init", lambda c: BUILD(c, "--router-init", "normal", "--expert-prompts", _file(c, "p.yaml", b"[]")),
         "--expert-prompts is read by --router-init prompts", OUT),
    Case("build-calibration-router-domains", lambda c: BUILD(c, "--router-init", "calibration", "--calibration", "embedded",
                                                             "--calibration-seq-len", "32", "--calibration-tokens", "512"),
         "one calibration domain per expert", OUT),
    Case("build-shard-size-zero", lambda c: BUILD(c, "--max-shard-mb", "0"), "--max-shard-mb is 0.0", OUT),
    Case("build-missing-partition", lambda c: BUILD(c, "--partition", str(c["tmp"] / "p.safetensors")), "does not exist", OUT),
    Case("build-partition-other-E", lambda c: BUILD(c, "--partition", str(c["partition"]), "--num-experts", "8"),
         "num_experts 8 (the file: 4) conflict with the partition file", OUT),
    Case("build-partition-other-method", lambda c: BUILD(c, "--partition", str(c["partition"]), "--method", "clustering"),
         "method 'clustering' (the file: 'random-split') conflict", OUT),
    Case("build-recipe-wrong-type", lambda c: BUILD(c, "--recipe", _recipe(c, "build:\n  num_experts: four\n")),
         "num_experts in recipe", OUT),
    Case("build-recipe-scale-not-a-number", lambda c: BUILD(c, "--recipe", _recipe(c, "build:\n  scale: big\n")),
         "scale in recipe", OUT),
    Case("build-partition-experts-alias", lambda c: BUILD(c, "--partition", str(c["partition"]), "--experts", "8"),
         "conflict with the partition file", OUT),
    Case("build-recipe-unknown-key", lambda c: BUILD(c, "--recipe", _recipe(c, "build:\n  top_kk: 2\n")), "did you mean top_k?", OUT),
    Case("build-recipe-missing", lambda c: BUILD(c, "--recipe", str(c["tmp"] / "none.yaml")), "does not exist", OUT),
    Case("build-recipe-not-yaml", lambda c: BUILD(c, "--recipe", _recipe(c, "build: [unclosed\n")), "not valid YAML", OUT),
    Case("build-recipe-binary", lambda c: BUILD(c, "--recipe", _file(c, "r.yaml", bytes(range(128, 256)))), "is not a text file", OUT),
    Case("build-out-is-a-file", lambda c: ["build", L(c), "--out", _file(c, "afile", b"x")], "is a file"),
    Case("build-out-not-empty", lambda c: ["build", L(c), "--out", _dir_with(c, "full-dir", {"keep.txt": "mine"})], "not empty"),
    Case("build-read-only", lambda c: ["build", L(c), "--out", str(c["mnt"] / "moe")], "Read-only file system",
         lambda c: c["mnt"] / "moe", "ro"),
    Case("build-disk-full", lambda c: ["build", L(c), "--out", str(c["mnt"] / "moe")], "No space left on device",
         lambda c: c["mnt"] / "moe", "full"),
    Case("build-tiny-gguf", lambda c: ["build", _file(c, "bad.gguf", b"GGUF" + bytes(96)), "--out", str(OUT(c))], "cannot load GGUF", OUT),
    Case("build-centroids-without-clustering", lambda c: BUILD(c, "--method", "random-split", "--num-experts", "4",
                                                               "--router-init", "centroids"), "not available with --method random-split", OUT),
    Case("build-shared-too-large", lambda c: BUILD(c, "--method", "random-split", "--num-experts", "4", "--shared-size", "96"),
         "--shared-size must be in [0, 96)", OUT),
    Case("build-needs-calibration", lambda c: BUILD(c, "--method", "sharing-inner", "--num-experts", "4"), "needs calibration text", OUT),
    Case("build-refit-needs-calibration", lambda c: BUILD(c, "--method", "random-split", "--num-experts", "4", "--refit"),
         "--refit needs calibration text: add --calibration embedded", OUT),
    Case("build-refit-upcycle", lambda c: BUILD(c, "--refit", "--calibration", "embedded"), "already starts at the dense model", OUT),
    Case("build-refit-mlp-gate", lambda c: BUILD(c, "--method", "random-split", "--num-experts", "4", "--gate", "mlp", "--refit",
                                                 "--calibration", "embedded"), "--refit fits a linear router", OUT),
    Case("build-calibration-without-reader", lambda c: BUILD(c, "--method", "random-split", "--num-experts", "4", "--calibration-tokens", "64"),
         "is read with --method", OUT),
    Case("split-refit", lambda c: ["split", L(c), "--method", "random-split", "--num-experts", "4", "--refit", "--out",
                                   str(c["tmp"] / "r.safetensors")], "--refit changes weights, not the partition",
         lambda c: c["tmp"] / "r.safetensors"),
    Case("train-online-refit", lambda c: ["train", "--from-dense", L(c), "--data", str(c["data"]), "--out", str(OUT(c)),
                                          "--method", "random-split", "--num-experts", "4", "--refit", "--calibration", "embedded"],
         "which online upcycling does not do on every rank", OUT),
    Case("build-bad-routing-choice", lambda c: BUILD(c, "--recipe", _recipe(c, "build:\n  routing: softmax\n")), "choose one of", OUT),
    # build: never the user's files, never its own input (issue 31)
    Case("build-force-over-user-dir", lambda c: ["build", L(c), "--out", _dir_with(c, "mine", {"keep.txt": "mine"}), "--force"],
         "is not empty and not a directory moeify wrote", keep=lambda c: c["tmp"] / "mine"),
    Case("build-out-is-model", lambda c: ["build", _copy(c, "llama", "m"), "--out", str(c["tmp"] / "m"), "--force"], "is the input",
         keep=lambda c: c["tmp"] / "m"),
    Case("build-out-holds-model", lambda c: ["build", _copy(c, "llama", "parent/m"), "--out", str(c["tmp"] / "parent"), "--force"],
         "holds the input", keep=lambda c: c["tmp"] / "parent"),
    Case("build-out-inside-model", lambda c: ["build", _copy(c, "llama", "m"), "--out", str(c["tmp"] / "m" / "moe")], "lies inside the input",
         keep=lambda c: c["tmp"] / "m"),
    Case("build-out-holds-recipe", lambda c: ["build", L(c), "--recipe", _recipe(c, "build:\n  top_k: 2\n"), "--out", str(c["tmp"]),
                                              "--force"], "holds the input", keep=lambda c: c["tmp"] / "recipe.yaml"),
    Case("build-scale-nan", lambda c: BUILD(c, "--scale", "nan"), "--scale is nan; it must be a finite number", OUT),
    Case("build-router-std-inf", lambda c: BUILD(c, "--router-std", "inf"), "--router-std is inf; it must be a finite number", OUT),
    Case("build-recipe-scale-inf", lambda c: BUILD(c, "--recipe", _recipe(c, "build:\n  scale: .inf\n")), "scale in recipe", OUT),
    Case("build-config-ffn-disagrees", lambda c: ["build", _with_config(c, "cfg", intermediate_size=128), "--out", str(OUT(c))],
         "model.layers.0.mlp.gate_proj.weight is [96, 64], but config.json (hidden_size 64, intermediate_size 128", OUT),
    Case("build-config-hidden-disagrees", lambda c: ["build", _with_config(c, "cfg", hidden_size=32), "--out", str(OUT(c))],
         "model.embed_tokens.weight is [320, 64], but config.json (hidden_size 32", OUT),
    Case("build-config-fewer-layers", lambda c: ["build", _with_config(c, "cfg", num_hidden_layers=1), "--out", str(OUT(c))],
         "holds more layers than config.json's num_hidden_layers 1", OUT),
    Case("build-drop-ratio-with-upcycle", lambda c: BUILD(c, "--drop-ratio", "0.3"),
         "--drop-ratio is read with --method drop-upcycle, not with --method upcycle", OUT),
    Case("build-granularity-with-random-split", lambda c: BUILD(c, "--method", "random-split", "--num-experts", "4", "--granularity", "2"),
         "--granularity is read with --method granular-upcycle, not with --method random-split", OUT),
    Case("build-activation-ratio-with-upcycle", lambda c: BUILD(c, "--activation-ratio", "0.5"),
         "--activation-ratio is read with --method carve, not with --method upcycle", OUT),
    Case("build-recovery-steps-removed", lambda c: BUILD(c, "--recovery-steps", "10"),
         "--recovery-steps was removed: carve's router-only recovery is now layer-wise distillation", OUT),
    Case("build-merge-others-without-btx", lambda c: BUILD(c, "--merge-others", "base"), "--merge-others is read with --method btx", OUT),
    Case("build-mlp-gate-init-without-mlp-gate", lambda c: BUILD(c, "--mlp-gate-init", "normal"), "--mlp-gate-init is read with --gate mlp",
         OUT),
    Case("build-renormalize-with-topk-softmax", lambda c: BUILD(c, "--no-renormalize"), "--renormalize is read with --routing softmax-topk",
         OUT),
    Case("build-mlp-gate-as-mixtral", lambda c: BUILD(c, "--gate", "mlp", "--format", "mixtral"),
         "--format mixtral cannot hold the mlp gate", OUT),
    # split
    Case("split-out-is-dir", lambda c: ["split", L(c), "--method", "random-split", "--num-experts", "4", "--out", str(c["tmp"])],
         "is a directory"),
    Case("split-with-partition", lambda c: ["split", L(c), "--partition", str(c["partition"]), "--out", str(c["tmp"] / "q.safetensors")],
         "is the input of build", lambda c: c["tmp"] / "q.safetensors"),
    Case("split-out-is-a-pipe", lambda c: ["split", L(c), "--method", "random-split", "--num-experts", "4", "--force", "--out", _fifo(c)],
         "is not a regular file or directory (a device, pipe"),
    Case("report-out-is-a-pipe", lambda c: ["report", _dir_with(c, "run", {"metrics.jsonl": "{}\n"}), "--force", "--out", _fifo(c)],
         "is not a regular file or directory"),
    Case("export-out-is-a-pipe", lambda c: ["export", str(c["moe"]), "--force", "--out", _fifo(c)], "is not a regular file or directory"),
    Case("split-read-only", lambda c: ["split", L(c), "--method", "random-split", "--num-experts", "4", "--out", str(c["mnt"] / "p.st")],
         "Read-only file system", lambda c: c["mnt"] / "p.st", "ro"),
    Case("split-disk-full", lambda c: ["split", L(c), "--method", "upcycle", "--num-experts", "96", "--out", str(c["mnt"] / "p.st")],
         "No space left on device", lambda c: c["mnt"] / "p.st", "full"),  # 2 layers x 96 x 96 int32 = 72 KiB > 64 KiB
    Case("split-calibration-seq-len", lambda c: ["split", L(c), "--method", "co-activation", "--calibration", "embedded",
                                                 "--calibration-seq-len", "1", "--out", str(c["tmp"] / "q.st")], "at least 2",
         lambda c: c["tmp"] / "q.st"),
    Case("split-graph-density-zero", lambda c: ["split", L(c), "--method", "co-activation", "--graph-density", "0",
                                                "--out", str(c["tmp"] / "q.st")], "--graph-density is 0.0; it must be in (0, 1]",
         lambda c: c["tmp"] / "q.st"),
    Case("split-bad-calibration-source", lambda c: ["split", L(c), "--method", "co-activation", "--num-experts", "4", "--calibration",
                                                    "nodomain", "--out", str(c["tmp"] / "q.st")], "is not DOMAIN=PATH",
         lambda c: c["tmp"] / "q.st"),
    Case("split-carve-ratio-not-dividing", lambda c: ["split", L(c), "--method", "carve", "--num-experts", "6", "--activation-ratio",
                                                      "0.3", "--calibration", "embedded", "--out", str(c["tmp"] / "q.st")],
         "--activation-ratio 0.3 with 6 experts, top-2 and FFN size 96 needs a shared block of", lambda c: c["tmp"] / "q.st"),
    Case("split-carve-too-little-text", lambda c: ["split", L(c), "--method", "carve", "--num-experts", "6", "--calibration", "embedded",
                                                   "--calibration-tokens", "64", "--calibration-seq-len", "32", "--out", str(c["tmp"] / "q.st")],
         "--method carve needs at least 128 (twice the hidden size", lambda c: c["tmp"] / "q.st"),
    Case("split-force-over-user-file", lambda c: ["split", L(c), "--method", "random-split", "--num-experts", "4", "--force", "--out",
                                                  _file(c, "notes.safetensors", b"mine")], "exists and is not a file moeify wrote",
         keep=lambda c: c["tmp"] / "notes.safetensors"),
    Case("split-out-inside-model", lambda c: ["split", _copy(c, "llama", "m"), "--method", "random-split", "--num-experts", "4", "--force",
                                              "--out", str(c["tmp"] / "m" / "model.safetensors")], "lies inside the input",
         keep=lambda c: c["tmp"] / "m"),
    Case("split-carve-balance-without-sigmoid", lambda c: ["split", L(c), "--method", "carve", "--num-experts", "6", "--balance-bias",
                                                           "--out", str(c["tmp"] / "q.st")], "--balance-bias needs a format",
         lambda c: c["tmp"] / "q.st"),
    # export
    Case("export-dense", lambda c: ["export", L(c), "--out", str(OUT(c))], "is a dense model; there is nothing to export", OUT),
    Case("export-stock-moe", lambda c: ["export", _stock_copy(c), "--out", str(OUT(c))], "is a stock MoE checkpoint without moeify.json", OUT),
    Case("export-unsupported-dtype", lambda c: ["export", str(c["moe"]), "--out", str(OUT(c)), "--dtype", "fp8"],
         "argument --dtype: invalid choice: 'fp8'", OUT),
    Case("export-missing", lambda c: ["export", str(c["tmp"] / "nope"), "--out", str(OUT(c))], "no model at", OUT),
    Case("export-read-only", lambda c: ["export", str(c["moe"]), "--out", str(c["mnt"] / "x")], "Read-only file system",
         lambda c: c["mnt"] / "x", "ro"),
    Case("export-out-is-input", lambda c: ["export", _copy(c, "moe", "x"), "--out", str(c["tmp"] / "x"), "--force"], "is the input",
         keep=lambda c: c["tmp"] / "x"),
    Case("export-force-over-user-dir", lambda c: ["export", str(c["moe"]), "--force", "--out", _dir_with(c, "mine", {"keep.txt": "m"})],
         "not a directory moeify wrote", keep=lambda c: c["tmp"] / "mine"),
    Case("export-out-not-empty", lambda c: ["export", str(c["moe"]), "--out", _dir_with(c, "occupied", {"a": "b"})], "not empty"),
    # compare-init
    Case("compare-unknown-method", lambda c: ["compare-init", L(c), "--methods", "upcycle,nope", "--out", str(OUT(c))],
         "unknown method 'nope'", OUT),
    Case("compare-eval-tokens-zero", lambda c: ["compare-init", L(c), "--eval-tokens", "0", "--out", str(OUT(c))], "at least 1", OUT),
    Case("compare-ratio-not-whole-blocks", lambda c: ["compare-init", L(c), "--activation-ratio", "0.3", "--out", str(OUT(c))],
         "--activation-ratio 0.3 of --blocks 16 is 4.8 blocks", OUT),
    Case("compare-upcycle-at-a-ratio", lambda c: ["compare-init", L(c), "--activation-ratio", "0.25", "--methods", "upcycle",
                                                  "--out", str(OUT(c))], "has no place at --activation-ratio 0.25", OUT),
    Case("compare-methods-empty", lambda c: ["compare-init", L(c), "--methods", "", "--out", str(OUT(c))], "--methods is ''; give a string",
         OUT),
    Case("compare-methods-twice", lambda c: ["compare-init", L(c), "--methods", "upcycle,upcycle", "--out", str(OUT(c))],
         "names a method twice", OUT),
    Case("compare-option-no-method-reads", lambda c: ["compare-init", L(c), "--methods", "upcycle,random-split", "--num-experts", "4",
                                                      "--drop-ratio", "0.2", "--out", str(OUT(c))],
         "--drop-ratio is read by none of the compared methods (upcycle, random-split)", OUT),
    Case("compare-out-holds-model", lambda c: ["compare-init", _copy(c, "llama", "parent/m"), "--out", str(c["tmp"] / "parent"), "--force"],
         "holds the input", keep=lambda c: c["tmp"] / "parent"),
    Case("compare-eval-tokens-below-block", lambda c: ["compare-init", L(c), "--eval-tokens", "16", "--block-size", "32", "--out", str(OUT(c))],
         "--eval-tokens 16 is less than one block of --block-size 32", OUT),
    Case("compare-block-size", lambda c: ["compare-init", L(c), "--block-size", "1", "--out", str(OUT(c))], "at least 2", OUT),
    # experiment
    Case("experiment-unknown", lambda c: ["experiment", "nope", "--out", str(OUT(c))], "no experiment 'nope'", OUT),
    Case("experiment-misspelt-arm-key", lambda c: ["experiment", _experiment(c, {"name": "x", "model": L(c), "arms": [
        {"name": "a", "biuld": {}}]}), "--out", str(OUT(c))], "biuld (did you mean build?)", OUT),
    Case("experiment-binary", lambda c: ["experiment", _file(c, "e.yaml", bytes(range(128, 256))), "--out", str(OUT(c))],
         "e.yaml is not a text file (not UTF-8)", OUT),
    Case("experiment-not-a-mapping", lambda c: ["experiment", _experiment(c, [1, 2]), "--out", str(OUT(c))], "an experiment is a mapping",
         OUT),
    Case("experiment-arm-name-escapes", lambda c: ["experiment", _experiment(c, {"name": "x", "model": L(c), "arms": [
        {"name": "../../escaped"}]}), "--out", str(OUT(c))], "the arm name '../../escaped' cannot name a file", OUT),
    Case("experiment-arm-names-repeat", lambda c: ["experiment", _experiment(c, {"name": "x", "model": L(c), "arms": [
        {"name": "a"}, {"name": "a"}]}), "--out", str(OUT(c))], "arm names repeat (a)", OUT),
    Case("experiment-shared-option-unread", lambda c: ["experiment", _experiment(c, {"name": "x", "model": L(c), "build": {"drop_ratio": 0.2},
        "arms": [{"name": "a", "build": {"method": "upcycle"}}]}), "--out", str(OUT(c))], "--drop-ratio is read by none of the arms (a)", OUT),
    Case("experiment-out-is-model", lambda c: ["experiment", "capacity", "--model", _copy(c, "llama", "m"), "--out", str(c["tmp"] / "m"),
                                               "--force"], "is the input", keep=lambda c: c["tmp"] / "m"),
    Case("experiment-arm-train-setting", lambda c: ["experiment", _experiment(c, {"name": "x", "model": L(c), "arms": [
        {"name": "a", "train": {"lr": -1}}]}), "--out", str(OUT(c))], "lr in experiment 'a' (train:) is -1", OUT),
    Case("experiment-no-arms", lambda c: ["experiment", _experiment(c, {"name": "x", "model": L(c), "arms": []}), "--out", str(OUT(c))],
         "the list of arms is empty", OUT),
    Case("experiment-max-tokens-zero", lambda c: ["experiment", "capacity", "--max-tokens", "0", "--out", str(OUT(c))], "at least 1", OUT),
    # quickstart
    Case("quickstart-negative-train-tokens", lambda c: ["quickstart", L(c), "--train-tokens", "-5", "--work-dir", str(OUT(c))],
         "--train-tokens is -5; it must be at least 0", OUT),
    Case("quickstart-top-k-zero", lambda c: ["quickstart", L(c), "--top-k", "0", "--work-dir", str(OUT(c))], "--top-k is 0", OUT),
    Case("quickstart-read-only", lambda c: ["quickstart", L(c), "--train-tokens", "0", "--eval-tokens", "64", "--block-size", "32",
                                            "--work-dir", str(c["mnt"] / "qs")], "Read-only file system", lambda c: c["mnt"] / "qs", "ro"),
    Case("quickstart-work-dir-is-model", lambda c: ["quickstart", _copy(c, "llama", "m"), "--work-dir", str(c["tmp"] / "m"),
                                                    "--eval-tokens", "64", "--block-size", "32"], "lies inside the input",
         keep=lambda c: c["tmp"] / "m"),
    Case("quickstart-work-dir-holds-user-dir", lambda c: ["quickstart", L(c), "--eval-tokens", "64", "--block-size", "32", "--work-dir",
                                                          str(Path(_dir_with(c, "w/upcycle", {"keep.txt": "m"})).parent)],
         "not a directory moeify wrote", keep=lambda c: c["tmp"] / "w"),
    Case("quickstart-missing-model", lambda c: ["quickstart", str(c["tmp"] / "nope"), "--work-dir", str(OUT(c))], "no model at", OUT),
    # data prepare
    Case("prepare-jsonl-not-utf8", lambda c: ["data", "prepare", L(c), "--source", "web=" + _file(c, "x.jsonl", NOT_UTF8_JSONL),
                                             "--out", str(OUT(c))], "x.jsonl:2 is not UTF-8 text", OUT),
    Case("prepare-text-not-utf8", lambda c: ["data", "prepare", L(c), "--source", "web=" + _file(c, "x.txt", b"caf\xe9 au lait " * 50),
                                              "--out", str(OUT(c))], "x.txt is not UTF-8 text (byte 0xe9 at offset 3)", OUT),
    Case("build-calibration-not-utf8", lambda c: BUILD(c, "--method", "random-split", "--num-experts", "4", "--refit", "--calibration",
                                                       "web=" + _file(c, "x.txt", b"caf\xe9 au lait " * 50)),
         "x.txt is not UTF-8 text", OUT),
    Case("prepare-parquet-text-of-ints", lambda c: ["data", "prepare", L(c), "--source", "web=" + _parquet_of_ints(c), "--out", str(OUT(c))],
         "ints.parquet's column 'text' holds int64, not strings", OUT),
    Case("prepare-seq-len", lambda c: ["data", "prepare", L(c), "--seq-len", "1", "--out", str(OUT(c))], "--seq-len is 1", OUT),
    Case("prepare-fake-parquet", lambda c: ["data", "prepare", L(c), "--source", f"web={_file(c, 'x.parquet', b'not parquet')}",
                                            "--out", str(OUT(c))], "cannot read", OUT),
    Case("prepare-bad-source-spec", lambda c: ["data", "prepare", L(c), "--source", "justapath", "--out", str(OUT(c))],
         "is not DOMAIN=PATH", OUT),
    Case("prepare-no-tokenizer", lambda c: ["data", "prepare", str(c["no_tokenizer"]), "--out", str(OUT(c))], "no usable tokenizer", OUT),
    Case("prepare-empty-source", lambda c: ["data", "prepare", L(c), "--source", f"web={_dir_with(c, 'blank', {'a.txt': ' '})}",
                                            "--out", str(OUT(c))], "has no text", OUT),
    Case("prepare-out-not-moeify", lambda c: ["data", "prepare", L(c), "--out", _dir_with(c, "mine", {"keep.txt": "mine"})],
         "not a directory moeify wrote", keep=lambda c: c["tmp"] / "mine"),
    Case("prepare-out-is-source", lambda c: ["data", "prepare", L(c), "--source", f"web={_dir_with(c, 'src', {'a.txt': 'hello ' * 200})}",
                                             "--out", str(c["tmp"] / "src"), "--force"], "is the input", keep=lambda c: c["tmp"] / "src"),
    Case("prepare-domain-escapes", lambda c: ["data", "prepare", L(c), "--source", f"../../x={_dir_with(c, 'src', {'a.txt': 'hi ' * 200})}",
                                              "--out", str(OUT(c))], "the domain '../../x' cannot name a file", OUT),
    Case("prepare-domain-hidden", lambda c: ["data", "prepare", L(c), "--source", f".x={_dir_with(c, 'src', {'a.txt': 'hi ' * 200})}",
                                             "--out", str(OUT(c))], "the domain '.x' cannot name a file", OUT),
    Case("prepare-read-only", lambda c: ["data", "prepare", L(c), "--out", str(c["mnt"] / "data")], "Read-only file system",
         lambda c: c["mnt"] / "data", "ro"),
    # eval
    Case("eval-seq-len-zero", lambda c: ["eval", L(c), "--seq-len", "0", "--out", str(OUT(c))], "--seq-len is 0", OUT),
    Case("eval-max-tokens-zero", lambda c: ["eval", L(c), "--max-tokens", "0", "--out", str(OUT(c))], "--max-tokens is 0", OUT),
    Case("eval-not-a-model", lambda c: ["eval", _dir_with(c, "nomodel", {"r.txt": "x"}), "--out", str(OUT(c))], "is not a model", OUT),
    Case("eval-empty-domain", lambda c: ["eval", L(c), "--data", f"web={_dir_with(c, 'blank2', {'a.txt': ' '})}", "--out", str(OUT(c))],
         "no text found", OUT),
    Case("eval-out-is-model", lambda c: ["eval", _copy(c, "llama", "m"), "--out", str(c["tmp"] / "m"), "--force"], "is the input",
         keep=lambda c: c["tmp"] / "m"),
    Case("eval-out-holds-data", lambda c: ["eval", L(c), "--data", f"web={_dir_with(c, 'd/web', {'a.txt': 'hi ' * 200})}", "--out",
                                           str(c["tmp"] / "d"), "--force"], "holds the input", keep=lambda c: c["tmp"] / "d"),
    Case("eval-read-only", lambda c: ["eval", L(c), "--max-tokens", "64", "--out", str(c["mnt"] / "e")], "Read-only file system",
         lambda c: c["mnt"] / "e", "ro"),
    # report, generate
    Case("report-no-metrics", lambda c: ["report", str(c["tmp"])], "has no metrics.jsonl"),
    Case("report-eval-missing", lambda c: ["report", _dir_with(c, "run", {"metrics.jsonl": "{}\n"}), "--eval", str(c["tmp"] / "nope")],
         "--eval " + "{tmp}/nope has no eval.json"),
    Case("report-force-over-user-file", lambda c: ["report", _dir_with(c, "run", {"metrics.jsonl": "{}\n", "report.html": "mine"}),
                                                   "--force"], "exists and is not a file moeify wrote", keep=lambda c: c["tmp"] / "run"),
    Case("report-out-is-metrics", lambda c: ["report", _dir_with(c, "run", {"metrics.jsonl": "{}\n"}), "--out",
                                             str(c["tmp"] / "run" / "metrics.jsonl"), "--force"], "is the input",
         keep=lambda c: c["tmp"] / "run"),
    Case("generate-negative-tokens", lambda c: ["generate", L(c), "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens is -1"),
    Case("generate-empty-prompt", lambda c: ["generate", L(c), "--prompt", "  "], "--prompt is '  '; give a string that is not empty"),
    Case("generate-tokenizer-larger-than-vocab", lambda c: ["generate", _tokenizer_too_large(c), "--prompt", "hi"],
         "tokenizer has 370 tokens, more than the model's 320 embeddings"),
    Case("eval-tokenizer-larger-than-vocab", lambda c: ["eval", _tokenizer_too_large(c), "--out", str(OUT(c))],
         "tokenizer has 370 tokens, more than the model's 320 embeddings", OUT),
    Case("generate-missing-model", lambda c: ["generate", str(c["tmp"] / "nope"), "--prompt", "hi"], "no model at"),
    # train
    Case("train-data-meta-cut-short", lambda c: [*TRAIN(c)[:2], "--data", _damaged_data(c, lambda d: (d / "meta.json").write_text('{"seq_len": 3')),
                                                 *TRAIN(c)[4:]], "meta.json is cut short or not JSON", OUT),
    Case("train-data-token-file-emptied", lambda c: [*TRAIN(c)[:2], "--data", _damaged_data(c, lambda d: (d / "code.train.bin").write_bytes(b"")),
                                                     *TRAIN(c)[4:]], "code.train.bin holds 0 bytes", OUT),
    Case("train-recipe-section-a-list", lambda c: [*TRAIN(c), "--recipe", _recipe(c, "train:\n  - 1\n")], "its train: section is a list", OUT),
    Case("train-batch-size-zero", lambda c: [*TRAIN(c), "--batch-size", "0"], "--batch-size is 0; it must be at least 1", OUT),
    Case("train-negative-lr", lambda c: [*TRAIN(c), "--lr", "-1"], "--lr is -1.0; it must be greater than 0", OUT),
    Case("train-negative-checkpoint-every", lambda c: [*TRAIN(c), "--checkpoint-every", "-1"], "--checkpoint-every is -1", OUT),
    Case("train-seq-len-conflicts-with-data", lambda c: [*TRAIN(c), "--seq-len", "512"], "conflicts with --data", OUT),
    Case("train-model-and-from-dense", lambda c: [*TRAIN(c), "--from-dense", L(c)], "give one of them", OUT),
    Case("train-resume-and-force", lambda c: [*TRAIN(c), "--resume", "--force"], "give one of them", OUT),
    Case("train-resume-nothing", lambda c: [*TRAIN(c), "--resume"], "holds no complete checkpoint", OUT),
    Case("train-recipe-wrong-type", lambda c: [*TRAIN(c), "--recipe", _recipe(c, "train:\n  batch_size: eight\n")], "batch_size in recipe",
         OUT),
    Case("train-micro-batch", lambda c: [*TRAIN(c), "--micro-batch", "3"], "must be a multiple of --micro-batch 3", OUT),
    Case("train-dynamic-without-eval", lambda c: [*TRAIN(c), "--dynamic", "softmax"], "set --eval-every N", OUT),
    Case("train-capacity-zero", lambda c: [*TRAIN(c), "--capacity-factor", "0"], "--capacity-factor is 0.0", OUT),
    Case("train-online-needs-partition", lambda c: ["train", "--from-dense", L(c), "--data", str(c["data"]), "--out", str(OUT(c)),
                                                    "--method", "clustering", "--num-experts", "4"], "needs a partition here", OUT),
    Case("train-disk-full-at-checkpoint", lambda c: [*TRAIN(c)[:4], "--out", str(c["mnt"] / "run"), *TRAIN(c)[6:], "--checkpoint-every", "1"],
         "No space left on device; free some space or write elsewhere; training stopped at step 1; no checkpoint was completed",
         lambda c: c["mnt"] / "run" / "checkpoints", "full-1m"),
    Case("train-grad-clip-nan", lambda c: [*TRAIN(c), "--grad-clip", "nan"], "--grad-clip is nan; it must be a finite number", OUT),
    Case("train-domain-weight-nan", lambda c: [*TRAIN(c), "--domain-weights", "code=nan,docstrings=1,reference=1"], "non-negative weight", OUT),
    Case("train-force-over-user-dir", lambda c: [*TRAIN(c)[:4], "--out", _dir_with(c, "mine", {"keep.txt": "m"}), *TRAIN(c)[6:], "--force"],
         "not a directory moeify wrote", keep=lambda c: c["tmp"] / "mine"),
    Case("train-out-is-model", lambda c: ["train", _copy(c, "moe", "m"), *TRAIN(c)[2:4], "--out", str(c["tmp"] / "m"), *TRAIN(c)[6:],
                                          "--force"], "is the input", keep=lambda c: c["tmp"] / "m"),
    Case("train-out-holds-data", lambda c: [*TRAIN(c)[:2], "--data", _copy(c, "data", "run/data"), "--out", str(c["tmp"] / "run"),
                                            *TRAIN(c)[6:], "--force"], "holds the input", keep=lambda c: c["tmp"] / "run"),
    # distillation (issue 32)
    Case("train-distill-dense", lambda c: ["train", L(c), *TRAIN(c)[2:], "--distill"], "--distill recovers an MoE from its dense parent", OUT),
    Case("train-distill-no-parent", lambda c: ["train", _stock_copy(c), *TRAIN(c)[2:], "--distill"],
         "has no moeify.json recording its dense parent; give --teacher PATH", OUT),
    Case("train-teacher-missing", lambda c: [*TRAIN(c), "--distill", "--teacher", str(c["tmp"] / "nope")], "no model at", OUT),
    Case("train-teacher-other-vocabulary", lambda c: [*TRAIN(c), "--distill", "--teacher", _tiny_llama(c, "t", vocab_size=256)],
         "has a vocabulary of 256 tokens, the student 320", OUT),
    Case("train-teacher-other-tokenizer", lambda c: [*TRAIN(c), "--distill", "--teacher", _other_tokenizer(c)],
         "has another tokenizer than the data and the student", OUT),
    Case("train-distill-alpha-above-1", lambda c: [*TRAIN(c), "--distill", "--distill-alpha", "1.5"], "--distill-alpha is 1.5; it must be in [0, 1]",
         OUT),
    Case("train-distill-temperature-zero", lambda c: [*TRAIN(c), "--distill", "--distill-temperature", "0"],
         "--distill-temperature is 0.0; it must be greater than 0", OUT),
    Case("train-teacher-without-distill", lambda c: [*TRAIN(c), "--teacher", L(c)], "--teacher is read with --distill or --layerwise", OUT),
    Case("train-layerwise-and-distill", lambda c: [*TRAIN(c), "--layerwise", "--distill"], "--layerwise and --distill are two stages", OUT),
    Case("train-layerwise-dense", lambda c: ["train", L(c), *TRAIN(c)[2:], "--layerwise"], "--layerwise recovers an MoE from its dense parent", OUT),
    Case("train-layerwise-teacher-other-layers", lambda c: [*TRAIN(c), "--layerwise", "--teacher", _tiny_llama(c, "deep", num_hidden_layers=3)],
         "has 3 layers of width 64, the student 2 of width 64", OUT),
    Case("train-layerwise-alpha", lambda c: [*TRAIN(c), "--layerwise", "--distill-alpha", "0.5"], "--distill-alpha is read with --distill", OUT),
    Case("train-layerwise-loss-chunk", lambda c: [*TRAIN(c), "--layerwise", "--loss-chunk", "64"], "--layerwise does not run; drop --loss-chunk", OUT),
    Case("train-trainable-unknown", lambda c: [*TRAIN(c), "--trainable", "routers"], "--trainable 'routers': give one of all, moe, frozen-router", OUT),
    Case("train-gradient-sync-one-process", lambda c: [*TRAIN(c), "--gradient-sync", "step"],
         "--gradient-sync chooses when FSDP2 reduce-scatters; one process has no gradient communication", OUT),
    Case("train-trainable-shared-absent", lambda c: [*TRAIN(c), "--trainable", "router,shared"], "this MoE has no shared expert; drop shared", OUT),
    Case("train-fails-in-new-folders", lambda c: [*TRAIN(c)[:4], "--out", str(c["tmp"] / "new" / "deeper" / "run"), *TRAIN(c)[6:], "--trainable",
                                                    "router,shared"], "this MoE has no shared expert", lambda c: c["tmp"] / "new"),
    Case("plan-model-not-a-model", lambda c: ["plan-memory", _dir_with(c, "not-a-model", {"config.json": "{}"})], "cannot read"),
    Case("inspect-empty-model", lambda c: ["inspect", ""], "--model is ''; give a string that is not empty"),
    Case("train-read-only", lambda c: [*TRAIN(c)[:4], "--out", str(c["mnt"] / "run"), *TRAIN(c)[6:]], "Read-only file system",
         lambda c: c["mnt"] / "run", "ro"),
]


@pytest.fixture(scope="module")
def context(tiny_models, tiny_moe, tiny_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad-input-shared")
    partition = root / "p.safetensors"
    assert main(["split", str(tiny_models["llama"]), "--method", "random-split", "--num-experts", "4", "--out", str(partition)]) == 0
    no_tokenizer = root / "no-tokenizer"
    no_tokenizer.mkdir()
    for file in (tiny_models["llama"]).iterdir():
        if not file.name.startswith("tokenizer") and file.name != "special_tokens_map.json":
            (no_tokenizer / file.name).write_bytes(file.read_bytes())
    return {"llama": tiny_models["llama"], "qwen2": tiny_models["qwen2"], "moe": tiny_moe, "data": tiny_data, "partition": partition,
            "no_tokenizer": no_tokenizer}


def test_the_table_covers_every_verb_with_at_least_sixty_cases():
    from moeify.cli import VERBS

    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)
    verb_of_prefix = {"compare": "compare-init", "prepare": "data prepare", "plan": "plan-memory"}
    covered = {verb_of_prefix.get(c.name.split("-")[0], c.name.split("-")[0]) for c in CASES}
    assert covered == {verb.name for verb in VERBS}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case: Case, context, tmp_path, capsys, monkeypatch):
    ctx = {**context, "tmp": tmp_path}
    with contextlib.ExitStack() as stack:
        if case.mount:
            ctx["mnt"] = stack.enter_context(target(tmp_path, case.mount, monkeypatch))
        argv = case.argv(ctx)
        kept = _tree(case.keep(ctx)) if case.keep else None
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        lines = error_lines(err)
        assert code == 2, f"exit {code}; stderr:\n{err}"
        assert "Traceback" not in err
        assert len(lines) == 1 and lines[0].startswith("moeify: error: "), f"expected one error line, got:\n{err}"
        fragment = case.fragment.replace("{tmp}", str(tmp_path))
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
        if os.path.lexists(tmp_path / "fifo"):
            assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode), "the named pipe was replaced"
        if case.keep:
            assert _tree(case.keep(ctx)) == kept, f"the user's files in {case.keep(ctx)} changed"
            assert not list(tmp_path.rglob(".*.tmp-*")), "temporary files left"
        if case.out is not None:
            out = case.out(ctx)
            assert not out.exists(), f"{out} was left behind"
            leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
            assert not leftovers, f"temporary files left: {leftovers}"


def test_torch_save_on_a_full_disk_is_reported_as_no_space(tmp_path, monkeypatch):
    # torch.save says "[enforce fail at inline_container.cc] unexpected pos" on a short write; a
    # checkpoint's RNG file written so gave that text (or a traceback) instead of the disk being full.
    import torch

    from moeify.errors import describe_os_error
    from moeify.train.checkpoint import _os_error

    with target(tmp_path, "full", monkeypatch) as full:
        if _MOUNTED["full"] != "tmpfs mount":
            pytest.skip("needs a real 64 KiB tmpfs (mount not allowed here)")
        with pytest.raises(RuntimeError) as raised:
            torch.save(torch.zeros(100_000), full / "rng-rank0.pt")
        message = describe_os_error(_os_error(raised.value, full))
    assert message == f"cannot write or read {full}: No space left on device (a write came up short); free some space or write elsewhere"
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError is not turned into an I/O error
        _os_error(RuntimeError("a bug"), full)
