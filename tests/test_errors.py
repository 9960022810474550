"""Bad input: one-line error naming the problem and the fix; nothing left in --out."""

import shutil
from pathlib import Path

import pytest
from transformers import GPT2Config, LlamaConfig

from moeify.cli import main
from tests.conftest import COMMON, error_lines, save_tiny


def _fails(capsys, argv: list[str], *expected: str) -> str:
    capsys.readouterr()  # drop what the test's own set-up printed
    assert main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, f"expected one line, got:\n{lines}"
    err = lines[0]
    assert err.startswith("moeify: error: ")
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


def _build(model: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--model", str(model), "--out", str(out), *extra]


def _nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_mlp_not_gated(capsys, tmp_path):
    gpt2 = save_tiny(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64), tmp_path / "gpt2")
    _fails(capsys, _build(gpt2, tmp_path / "out"), "gpt2", "gated-MLP")
    _nothing_written(tmp_path / "out")


def test_activation_not_silu(capsys, tmp_path):
    gelu = save_tiny(LlamaConfig(**COMMON, hidden_act="gelu"), tmp_path / "gelu")
    _fails(capsys, _build(gelu, tmp_path / "out"), "gelu", "SwiGLU")


def test_ffn_not_divisible(capsys, tiny_models, tmp_path):
    _fails(capsys, _build(tiny_models["llama"], tmp_path / "out", "--method", "random-split", "--experts", "7"),
           "96", "not divisible", "--num-experts 7")
    _nothing_written(tmp_path / "out")


def test_more_experts_than_neurons(capsys, tiny_models, tmp_path):
    _fails(capsys, _build(tiny_models["llama"], tmp_path / "out", "--method", "random-split", "--experts", "97", "--top-k", "1"),
           "larger than the FFN size")


@pytest.mark.parametrize("top_k, fragment", [("9", "larger than --num-experts"), ("0", "at least 1")])
def test_bad_top_k(capsys, tiny_models, tmp_path, top_k, fragment):
    _fails(capsys, _build(tiny_models["llama"], tmp_path / "out", "--experts", "8", "--top-k", top_k), "--top-k", fragment)
    _nothing_written(tmp_path / "out")


def test_missing_weights_file(capsys, tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], broken)
    (broken / "model.safetensors").unlink()
    _fails(capsys, _build(broken, tmp_path / "out"), "model.safetensors", "not a safetensors model directory")


def test_truncated_weights_file(capsys, tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(capsys, _build(broken, tmp_path / "out"), "truncated", "re-download")
    _nothing_written(tmp_path / "out")


def test_missing_shard_of_sharded_model(capsys, tmp_path):
    from tests.conftest import TINY_CONFIGS

    dense = save_tiny(TINY_CONFIGS["llama"](), tmp_path / "dense", max_shard_size="50KB")
    sorted(dense.glob("model-*.safetensors"))[-1].unlink()
    _fails(capsys, _build(dense, tmp_path / "out"), "missing weight file")
    _nothing_written(tmp_path / "out")


def test_nonexistent_path(capsys, tmp_path):
    _fails(capsys, _build(tmp_path / "nope", tmp_path / "out"), "no model at", "smollm2-135m")


def test_out_exists_and_not_empty(capsys, tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, _build(tiny_models["llama"], out), "not empty", "choose another path")
    _fails(capsys, _build(tiny_models["llama"], out, "--force"), "not empty", "never anything else")  # not moeify's: kept
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    moe = tmp_path / "moe"
    assert main(_build(tiny_models["llama"], moe)) == 0
    _fails(capsys, _build(tiny_models["llama"], moe), "exists", "--force")
    (moe / "stale.txt").write_text("x")
    assert main(_build(tiny_models["llama"], moe, "--force")) == 0  # moeify's own output: replaced whole
    assert not (moe / "stale.txt").exists() and (moe / "config.json").exists()


def test_failure_midway_leaves_nothing(tiny_models, tmp_path, monkeypatch, capsys):
    # A crash while writing (here: the writer raising on its third tensor) must not leave a partial --out.
    from moeify.checkpoint import writer

    calls = {"n": 0}
    real_add = writer.ShardedWriter.add

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_add(self, name, tensor)

    monkeypatch.setattr(writer.ShardedWriter, "add", failing_add)
    _fails(capsys, _build(tiny_models["llama"], tmp_path / "out"), "disk full")  # an OSError becomes one line, exit 2
    _nothing_written(tmp_path / "out")
    assert calls["n"] == 3  # the failure happened mid-write, not before it


def test_sigterm_caught_inside_native_code_is_still_the_stop(tiny_models, tmp_path, monkeypatch, capsys):
    """SIGTERM's exception raised while torch's native code called back into Python came out as a ValueError
    (landing CI: "could not determine the shape of object type 'torch.storage.UntypedStorage'" from safetensors'
    get_tensor). Whatever exception follows a SIGTERM is the stop: exit 143, one line, nothing written."""
    import os
    import signal

    from moeify.checkpoint import dense
    from moeify.cli import Terminated

    real_get = dense.DenseCheckpoint.get
    calls = {"n": 0}

    def get_that_swallows_the_signal(self, name):
        calls["n"] += 1
        if calls["n"] == 3:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the handler runs before this returns
            except Terminated:
                raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
        return real_get(self, name)

    monkeypatch.setattr(dense.DenseCheckpoint, "get", get_that_swallows_the_signal)
    capsys.readouterr()
    assert main(_build(tiny_models["llama"], tmp_path / "out")) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "moeify: terminated"
    _nothing_written(tmp_path / "out")
    assert main(_build(tiny_models["llama"], tmp_path / "out")) == 0  # the next run in this process is not taken for a stop


def test_a_temporary_left_by_a_killed_build_is_removed_by_the_next(tiny_models, tmp_path):
    import socket
    import subprocess
    import sys

    out = tmp_path / "moe"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    left = [tmp_path / f".moe.tmp-{dead}", tmp_path / f".moe.tmp-{socket.gethostname()}-{dead}"]  # before and after host names
    elsewhere = tmp_path / ".moe.tmp-another-host-1"  # a process of another machine sharing the disk: not ours to judge
    for directory in (*left, elsewhere):
        directory.mkdir()
        (directory / "model-00001.safetensors").write_bytes(b"half")
    assert main(_build(tiny_models["llama"], out, "--method", "upcycle", "--experts", "2", "--top-k", "1")) == 0
    assert (out / "config.json").is_file() and not any(path.exists() for path in left) and elsewhere.is_dir()
    assert not list(tmp_path.glob(f".moe.tmp-{socket.gethostname()}-*"))


@pytest.mark.slow
def test_sigterm_during_build_leaves_nothing(tmp_path):
    """SmolLM2's random split (a few seconds of writing): SIGTERM once its temporary exists."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "moe"
    for _ in range(3):  # on a saturated machine the build may finish before this loop sees its temporary: try again
        shutil.rmtree(out, ignore_errors=True)  # what a finished attempt wrote
        process = subprocess.Popen([sys.executable, "-m", "moeify", "build", "--model", "smollm2-135m", "--out", str(out), "--method",
                                    "random-split", "--experts", "8", "--top-k", "2"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None and not list(tmp_path.glob(".moe.tmp-*")):
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        if process.returncode != 0:
            break
    assert process.returncode == 143 and stderr.strip().endswith("moeify: terminated"), stderr[-2000:]
    _nothing_written(out)
