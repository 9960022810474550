"""Layer-wise distillation (`moeify train --layerwise`): each MoE block regresses its dense FFN's output."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moeify.build import build, build_config
from moeify.data.packed import PackedDataset
from moeify.data.prepare import tokenizer_fingerprint
from moeify.modeling.load import load_moe_model
from moeify.train.distributed import DistEnv
from moeify.train.layerwise import layerwise_errors
from moeify.train.loop import train
from moeify.train.parallelize import Layout
from moeify.train.teacher import load_teacher
from tests.conftest import train_config
from tests.test_distributed import STEPS, _torchrun

ONE = DistEnv(0, 1, 0, torch.device("cpu"))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(model: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(model.glob("*.safetensors")) for k, v in load_file(f).items()}


@torch.no_grad()
def _stock_errors(dense: Path, moe: Path, ids: torch.Tensor) -> list[float]:
    """Per layer, over the batch: ||stock MoE block(x) - y||^2 / ||y||^2 with x, y the stock dense model's FFN input and output."""
    parent = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    seen = []
    handles = [layer.mlp.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for layer in parent.model.layers]
    parent(input_ids=ids)
    for handle in handles:
        handle.remove()
    errors = []
    for layer, (x, y) in zip(student.model.layers, seen):
        out = layer.mlp(x)
        out = out[0] if isinstance(out, tuple) else out
        errors.append(float((out - y).pow(2).sum() / y.pow(2).sum()))
    return errors


@pytest.fixture(scope="module")
def split_moe(tiny_models, tmp_path_factory) -> Path:
    return build(build_config(model=str(tiny_models["llama"]), out=tmp_path_factory.mktemp("split") / "moe", method="random-split",
                              num_experts=4, top_k=2, router_std=0.1), progress=False)


def test_a_split_with_every_expert_active_starts_at_zero_block_loss(tiny_models, tiny_data, tmp_path):
    moe = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "moe", method="random-split", num_experts=4, top_k=4,
                             router_std=0.0, scale=4.0), progress=False)
    train(train_config(moe, tiny_data, tmp_path / "run", layerwise=True, max_tokens=8 * 32, balance_coef=0.0), progress=False)
    step = _records(tmp_path / "run")[1]
    assert step["loss"] < 1e-10 and max(step["layer_loss"]) < 1e-10 and step["grad_norm"] < 1e-6, step


def test_the_block_loss_is_the_reconstruction_error_in_stock_transformers_and_training_lowers_it(tiny_models, tiny_data, split_moe, tmp_path):
    ids = PackedDataset(tiny_data).blocks("code", "val", 4).long()
    teacher = load_teacher(tiny_models["llama"], ONE, Layout(1), torch.float32, 320, tokenizer_fingerprint(tiny_models["llama"]))
    model, _ = load_moe_model(split_moe)
    with torch.no_grad():
        errors_BL = layerwise_errors(model, teacher, ids)
    expected = _stock_errors(tiny_models["llama"], split_moe, ids)
    # Per layer over the batch: the per-sequence ratios weighted by each sequence's ||y||^2 give the batch ratio.
    weights = torch.stack([teacher_y.pow(2).sum((1, 2)) for _, teacher_y in _teacher_outputs(teacher, ids)], dim=1)
    batch = (errors_BL * weights).sum(0) / weights.sum(0)
    torch.testing.assert_close(batch, torch.tensor(expected), rtol=1e-5, atol=1e-7)

    result = train(train_config(split_moe, tiny_data, tmp_path / "run", layerwise=True, max_tokens=8 * 32 * 3, lr=3e-3, export=True),
                   progress=False)
    after = _stock_errors(tiny_models["llama"], result.model_dir, ids)
    assert sum(after) < 0.9 * sum(expected), (expected, after)


def _teacher_outputs(teacher, ids):
    from moeify.train.layerwise import teacher_ffn_io

    recorded = teacher_ffn_io(teacher, ids, list(range(len(teacher.model.model.layers))))
    return [recorded[i] for i in sorted(recorded)]


@pytest.mark.parametrize("trainable, changed", [("all", {"router", "experts"}), ("router", {"router"})])
def test_only_the_chosen_parts_of_the_moe_blocks_train(split_moe, tiny_data, tmp_path, trainable, changed):
    result = train(train_config(split_moe, tiny_data, tmp_path / "run", layerwise=True, trainable=trainable, max_tokens=8 * 32 * 2,
                                export=True), progress=False)
    before, after = _weights(split_moe), _weights(result.model_dir)
    assert before.keys() == after.keys()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    parts = {"router" if ".gate." in name else "experts" if ".experts." in name else name for name in moved}
    assert parts == changed, sorted(moved)[:5]
    assert json.loads((result.model_dir / "moeify.json").read_text())["source_path"]  # a --distill run after it finds the teacher


def test_resume_during_layerwise_distillation_is_exact(split_moe, tiny_data, tmp_path):
    settings = dict(layerwise=True, checkpoint_every=2, max_tokens=8 * 32 * 5)
    full = train(train_config(split_moe, tiny_data, tmp_path / "full", **settings), progress=False)
    first = train(train_config(split_moe, tiny_data, tmp_path / "split", **settings), progress=False, stop_after_steps=2)
    second = train(train_config(split_moe, tiny_data, tmp_path / "split", resume=True, **settings), progress=False)
    torch.testing.assert_close(first.losses + second.losses, full.losses, rtol=1e-6, atol=1e-7)
    assert full.losses[-1] < full.losses[0]


def test_fsdp2_layerwise_on_two_ranks_matches_one_rank(split_moe, tiny_data, tmp_path):
    # Each MoE block is an FSDP2 unit of its own and runs without its layer; the teacher is sharded too.
    single = train(train_config(split_moe, tiny_data, tmp_path / "one", layerwise=True, max_tokens=8 * 32 * STEPS), progress=False)
    two = [r for r in _torchrun(split_moe, tiny_data, tmp_path / "two", "fsdp", "--layerwise", "--no-export") if "layer_loss" in r]
    one = [r for r in _records(tmp_path / "one") if "layer_loss" in r]
    assert len(two) == len(one) == STEPS
    for a, b in zip(two, one):  # other micro-batches: the Switch loss per micro-batch is not linear (see test_distributed)
        torch.testing.assert_close(torch.tensor(a["layer_loss"]), torch.tensor(b["layer_loss"]), rtol=1e-3, atol=1e-5)
    assert single.heldout and _records(tmp_path / "two")[-1]["heldout_loss"].keys() == single.heldout.keys()
