"""Recovery by distillation from the dense parent (`moeify train --distill`)."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeify.build import build, build_config
from moeify.modeling.chunked_loss import install_chunked_loss
from moeify.modeling.load import load_moe_model
from moeify.train.distributed import DistEnv
from moeify.train.loop import train
from moeify.train.parallelize import Layout
from moeify.train.teacher import distill_losses, load_teacher
from tests.conftest import train_config
from tests.test_distributed import run_group

ONE = DistEnv(0, 1, 0, torch.device("cpu"))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def upcycled(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("upcycled")
    return {name: build(build_config(model=str(tiny_models[name]), out=root / name, method="upcycle", num_experts=4, top_k=2),
                        progress=False) for name in ("llama", "llama-tied")}


def test_an_upcycled_moe_distilled_from_its_parent_has_zero_kl_and_zero_gradient(upcycled, tiny_data, tmp_path):
    # The MoE computes its parent's function exactly, so the KL is 0 and so is its gradient: the test that
    # the teacher, the chunking and the temperature are wired right. No balance loss (it has a gradient of its own).
    result = train(train_config(upcycled["llama"], tiny_data, tmp_path / "run", distill=True, balance_coef=0.0, max_tokens=8 * 32,
                                distill_temperature=2.0, loss_chunk=50), progress=False)
    step = _records(tmp_path / "run")[1]
    assert step["kd_loss"] < 1e-7 and step["grad_norm"] < 1e-5, step
    assert abs(step["teacher_ce"] - step["loss"]) < 1e-5 and step["distill_loss"] == pytest.approx(4 * step["kd_loss"], abs=1e-12)
    assert set(step["domain_kd_loss"]) == set(step["domain_teacher_ce"]) == set(step["domain_loss"])
    assert result.finished


@pytest.mark.parametrize("name, tau", [("llama", 2.0), ("llama-tied", 2.0), ("llama", 1.0)])
def test_the_fused_chunked_objective_equals_autograd_on_the_whole_logits(name, tau, tiny_models, tmp_path):
    # The head computes the objective's gradient in its forward, chunk by chunk (closed form); autograd
    # through the textbook formula on the full logits must give the same values and every parameter's gradient.
    student = build(build_config(model=str(tiny_models[name]), out=tmp_path / "moe", method="random-split", num_experts=4,
                                 top_k=2, router_std=0.1), progress=False)
    teacher = load_teacher(tiny_models[name], ONE, Layout(1), torch.float32, 320, _fingerprint(tiny_models[name]))
    ids = torch.randint(320, (3, 17), generator=torch.Generator().manual_seed(0))
    alpha = 0.3
    results = []
    for chunk in (0, 7):  # one chunk of all 48 positions; seven of at most 7
        model, _ = load_moe_model(student)
        install_chunked_loss(model, chunk, always=True)
        per_sequence = distill_losses(model, teacher, ids, alpha, tau)
        per_sequence[:, 0].mean().backward()
        results.append((per_sequence.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    model, _ = load_moe_model(student)
    parent, _ = load_moe_model(tiny_models[name])
    logits = model(ids[:, :-1]).logits
    with torch.no_grad():
        teacher_logits = parent(ids[:, :-1]).logits
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    kl = F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(teacher_logits / tau, -1), log_target=True, reduction="none").sum(-1)
    objective = (1 - alpha) * nll + alpha * tau**2 * kl
    objective.mean().backward()
    teacher_nll = F.cross_entropy(teacher_logits.transpose(1, 2), ids[:, 1:], reduction="none")
    expected = torch.stack([objective, nll, kl, teacher_nll], dim=2).mean(dim=1).detach()
    for values, grads in results:
        torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-6)
        for param, tensor in model.named_parameters():
            torch.testing.assert_close(grads[param], tensor.grad, rtol=1e-4, atol=1e-7)


def _fingerprint(model: Path) -> str:
    from moeify.data.prepare import tokenizer_fingerprint

    return tokenizer_fingerprint(model)


def test_resume_during_distillation_is_exact(tiny_moe, tiny_data, tmp_path):
    settings = dict(distill=True, distill_alpha=0.7, distill_temperature=1.5, checkpoint_every=2, max_tokens=8 * 32 * 6)
    full = train(train_config(tiny_moe, tiny_data, tmp_path / "full", **settings), progress=False)
    first = train(train_config(tiny_moe, tiny_data, tmp_path / "split", **settings), progress=False, stop_after_steps=3)
    second = train(train_config(tiny_moe, tiny_data, tmp_path / "split", resume=True, **settings), progress=False)
    torch.testing.assert_close(first.losses + second.losses, full.losses, rtol=1e-6, atol=1e-6)
    kd = lambda run: [r["distill_loss"] for r in _records(run) if "distill_loss" in r]  # noqa: E731
    torch.testing.assert_close(kd(tmp_path / "split"), kd(tmp_path / "full"), rtol=1e-6, atol=1e-6)
    assert kd(tmp_path / "full")[-1] < kd(tmp_path / "full")[0]  # it learns from the teacher


def test_fsdp2_distillation_on_two_ranks_matches_one_rank(tiny_moe, tiny_data, tmp_path):
    # The teacher is sharded with FSDP2 like the student; same global batch as one process (see test_distributed).
    steps = 4
    train(train_config(tiny_moe, tiny_data, tmp_path / "one", distill=True, distill_alpha=0.5, max_tokens=8 * 32 * steps,
                                lr=3e-3), progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moeify", "train",
               "--model", str(tiny_moe), "--data", str(tiny_data), "--out", str(tmp_path / "two"), "--batch-size", "8",
               "--micro-batch", "2", "--max-tokens", str(8 * 32 * steps), "--lr", "3e-3", "--warmup-steps", "2", "--eval-blocks", "4",
               "--distill", "--distill-alpha", "0.5", "--no-export"]
    result = run_group(command, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [r for r in _records(tmp_path / "two") if "distill_loss" in r]
    one = [r for r in _records(tmp_path / "one") if "distill_loss" in r]
    assert len(records) == len(one) == steps
    for a, b in zip(records, one):
        assert abs(a["distill_loss"] - b["distill_loss"]) < 2e-3 and abs(a["teacher_ce"] - b["teacher_ce"]) < 1e-4, (a, b)
