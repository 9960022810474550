"""Online upcycling: the MoE built inside the (distributed) job equals the offline build."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoConfig

from moeify.errors import MoeifyError
from moeify.modeling.hf import stock_state_dict
from moeify.train.loop import train
from tests.conftest import train_config
from tests.test_distributed import free_port, run_group

# The tiny_moe fixture: random-split of the tiny Llama, 4 experts, top-2, router std 0.1, seed 0.
ONLINE = dict(method="random-split", num_experts=4, top_k=2, router_std=0.1)


def construction(**settings):
    from moeify.construct import ConstructionConfig
    from moeify.schema import from_flat

    return from_flat(ConstructionConfig, settings)
ONLINE_FLAGS = ["--method", "random-split", "--experts", "4", "--top-k", "2", "--router-std", "0.1"]


def _initial_weights(run: Path, moe_config) -> dict[str, torch.Tensor]:
    """Model tensors of the step-0 checkpoint (merged over ranks), under the stock on-disk names."""
    merged = run / "merged.pt"
    dcp_to_torch_save(run / "checkpoints" / "step-000000" / "dcp", merged)
    state = torch.load(merged)["model"]
    return stock_state_dict(state, moe_config)


def _assert_same_as_offline(weights: dict, tiny_moe: Path) -> None:
    offline = load_file(str(tiny_moe / "model.safetensors"))
    assert sorted(weights) == sorted(offline)
    for name in offline:
        assert torch.equal(weights[name], offline[name]), name


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_one_process_online_build_equals_offline_build(family, tiny_models, tiny_data, tmp_path):
    from moeify.build import build, build_config

    offline = build(build_config(model=str(tiny_models[family]), out=tmp_path / "offline", method="random-split", num_experts=4, top_k=2, router_std=0.1), progress=False)
    config = train_config(None, tiny_data, tmp_path / "run", from_dense=str(tiny_models[family]))
    train(config, construction(**ONLINE), progress=False, stop_after_steps=0)
    _assert_same_as_offline(_initial_weights(tmp_path / "run", AutoConfig.from_pretrained(offline)), offline)


def _torchrun(out: Path, tiny_data: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moeify", "train",
               "--data", str(tiny_data), "--out", str(out), "--batch-size", "8", "--micro-batch", "2", "--max-tokens", str(8 * 32 * 4),
               "--lr", "3e-3", "--warmup-steps", "2", "--eval-blocks", "4", "--no-export", *flags]
    result = run_group(command, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _metrics(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_online_build_equals_offline_then_trains_identically(tiny_models, tiny_moe, tiny_data, tmp_path):
    dense = str(tiny_models["llama"])
    _torchrun(tmp_path / "init", tiny_data, "--from-dense", dense, *ONLINE_FLAGS, "--stop-after-steps", "0")
    shards = sorted(p.name for p in (tmp_path / "init" / "checkpoints" / "step-000000" / "dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    _assert_same_as_offline(_initial_weights(tmp_path / "init", AutoConfig.from_pretrained(tiny_moe)), tiny_moe)

    _torchrun(tmp_path / "online", tiny_data, "--from-dense", dense, *ONLINE_FLAGS)
    _torchrun(tmp_path / "offline", tiny_data, "--model", str(tiny_moe))
    online, offline = _metrics(tmp_path / "online"), _metrics(tmp_path / "offline")
    assert [r["loss"] for r in online[1:]] == pytest.approx([r["loss"] for r in offline[1:]], abs=1e-6)
    assert online[0]["built_online"] and len(online[0]["peak_rss_mb_after_build"]) == 2  # one figure per rank
    assert all(mb > 0 for mb in online[-1]["peak_rss_mb"])


def test_experts_not_divisible_by_ranks_are_built_exactly(tiny_models, tiny_data, tmp_path):
    # 3 experts on 2 ranks: FSDP2 shards the expert tensors on a dimension 2 divides (not the experts).
    from moeify.build import build, build_config

    dense = tiny_models["llama"]
    offline = build(build_config(model=str(dense), out=tmp_path / "offline", method="random-split", num_experts=3, top_k=1),
                    progress=False)
    _torchrun(tmp_path / "run", tiny_data, "--from-dense", str(dense), "--method", "random-split", "--experts", "3", "--top-k", "1",
              "--stop-after-steps", "0")
    _assert_same_as_offline(_initial_weights(tmp_path / "run", AutoConfig.from_pretrained(offline)), offline)


def test_different_seeds_on_different_ranks(tiny_models, tiny_data, tmp_path):
    processes, port = [], free_port()
    for rank, seed in ((0, "1"), (1, "2")):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        command = [sys.executable, "-m", "moeify", "train", "--from-dense", str(tiny_models["llama"]), "--data", str(tiny_data),
                   "--out", str(tmp_path / "run"), "--batch-size", "8", "--micro-batch", "2", "--max-tokens", "1024", "--seed", seed]
        processes.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True))
    outputs = [p.communicate(timeout=180)[1] for p in processes]
    assert all(p.returncode == 2 for p in processes), outputs
    assert "ranks disagree on the construction settings" in outputs[0]
    assert "moeify: error" not in outputs[1]  # the ranks agreed on the error: rank 0 prints it


def test_dense_checkpoint_missing_tensors(tiny_models, tiny_data, tmp_path):
    broken = tmp_path / "dense"
    shutil.copytree(tiny_models["llama"], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MoeifyError, match="lacks model.layers.1.mlp.up_proj.weight"):
        train(train_config(None, tiny_data, tmp_path / "run", from_dense=str(broken)), construction(**ONLINE), progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# (split flags or None for a method without a partition file, build/online flags, the format it lands in)
CONSTRUCTIONS = {
    "shared-expert": (["--method", "random-split", "--shared-size", "16", "--seed", "3"], [], "Qwen2MoeForCausalLM"),
    "centroids": (["--method", "clustering"], ["--router-init", "centroids"], "MixtralForCausalLM"),
    "virtual-group": (["--method", "granular-upcycle", "--granularity", "2"], [], "MixtralForCausalLM"),
    "drop-upcycle": (None, ["--method", "drop-upcycle", "--drop-ratio", "0.25"], "MixtralForCausalLM"),
    "named-format": (None, ["--method", "upcycle", "--format", "qwen2_moe", "--routing", "softmax-topk", "--no-renormalize"],
                     "Qwen2MoeForCausalLM"),
    "carve": (["--method", "carve", "--calibration", "embedded", "--calibration-tokens", "1024", "--calibration-seq-len", "64",
               "--routing", "sigmoid-topk", "--balance-bias"], ["--routing", "sigmoid-topk"], "Glm4MoeForCausalLM"),
    "sigmoid-mlp-gate": (["--method", "random-split", "--shared-size", "16"],
                         ["--routing", "sigmoid-topk", "--no-renormalize", "--gate", "mlp"], "Glm4MoeForCausalLM"),
}
TRAIN_FLAGS = ["--batch-size", "8", "--micro-batch", "2", "--max-tokens", str(8 * 32 * 4), "--no-export"]


def _offline_and_online_flags(name: str, dense: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """Build the case with `moeify build`; return its directory and the construction flags online upcycling gets."""
    from moeify.cli import main

    split_flags, flags, architecture = CONSTRUCTIONS[name]
    drawn = name not in ("centroids", "carve")  # their routers come from the partition: --router-std is not read
    flags = [*flags, "--num-experts", "4", "--top-k", "2", *(["--router-std", "0.1"] if drawn else [])]
    if split_flags is not None:
        partition = tmp_path / "p.safetensors"
        assert main(["split", dense, *split_flags, "--num-experts", "4", "--out", str(partition)]) == 0
        flags += ["--partition", str(partition)]
    offline = tmp_path / "offline"
    assert main(["build", dense, "--out", str(offline), *flags]) == 0
    assert AutoConfig.from_pretrained(offline).architectures == [architecture]
    return offline, flags


@pytest.mark.parametrize("name", list(CONSTRUCTIONS))
def test_online_build_is_bit_identical_to_build_for_every_option(name, tiny_models, tiny_data, tmp_path):
    from moeify.cli import main

    dense = str(tiny_models["llama"])
    offline, flags = _offline_and_online_flags(name, dense, tmp_path)
    seed = ["--seed", "3"] if name == "shared-expert" else []  # online constructs with the training seed
    assert main(["train", "--from-dense", dense, "--data", str(tiny_data), "--out", str(tmp_path / "run"), *TRAIN_FLAGS, *flags,
                 *seed, "--stop-after-steps", "0"]) == 0
    _assert_same_as_offline(_initial_weights(tmp_path / "run", AutoConfig.from_pretrained(offline)), offline)


@pytest.mark.parametrize("name", ["shared-expert", "sigmoid-mlp-gate"])
def test_two_rank_online_build_is_bit_identical_to_build(name, tiny_models, tiny_data, tmp_path):
    dense = str(tiny_models["llama"])
    offline, flags = _offline_and_online_flags(name, dense, tmp_path)
    seed = ["--seed", "3"] if name == "shared-expert" else []
    _torchrun(tmp_path / "init", tiny_data, "--from-dense", dense, *flags, *seed, "--stop-after-steps", "0")
    _assert_same_as_offline(_initial_weights(tmp_path / "init", AutoConfig.from_pretrained(offline)), offline)


def test_a_data_driven_method_online_without_a_partition_is_refused(tiny_models, tiny_data, tmp_path, capsys):
    from moeify.cli import main

    assert main(["train", "--from-dense", str(tiny_models["llama"]), "--data", str(tiny_data), "--out", str(tmp_path / "run"),
                 *TRAIN_FLAGS, "--method", "clustering", "--num-experts", "4"]) == 2
    error = capsys.readouterr().err
    assert "--method clustering needs a partition here: run `moeify split" in error and error.count("\n") == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
