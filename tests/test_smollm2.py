"""The embedded default model, SmolLM2-135M-Instruct (GGUF from PyPI, converted once and cached)."""

import json
import math

import pytest

from moeify.cli import main
from moeify.quickstart import QuickstartConfig, format_rows, quickstart

pytestmark = pytest.mark.slow


def test_quickstart_numbers_are_sane(tmp_path):
    rows = quickstart(QuickstartConfig(work_dir=tmp_path, eval_tokens=512, train_tokens=4096, calibration_tokens=4096))
    dense, upcycled, carved, carved_distilled, split, trained, distilled = rows
    # Copy-upcycling reproduces the dense model on real text, after a reload with stock transformers.
    assert upcycled.max_abs_logit_diff is not None and upcycled.max_abs_logit_diff <= 1e-4
    assert abs(upcycled.perplexity - dense.perplexity) < 1e-3 * dense.perplexity
    assert upcycled.completion == dense.completion and "Paris" in dense.completion
    assert 5 < dense.perplexity < 50
    assert math.isfinite(split.perplexity) and split.perplexity > dense.perplexity
    # Carving at 50% activation keeps a language model without training; the random split does not.
    assert dense.perplexity < carved.perplexity < 4 * dense.perplexity < split.perplexity / 100
    assert carved.active_params < upcycled.active_params and carved.total_params < 1.1 * dense.total_params
    # 8 experts top-2: the copies multiply the FFN by 8 but each token uses 2 of them.
    assert upcycled.total_params > 5 * dense.total_params and upcycled.active_params < 2 * dense.active_params
    assert split.total_params - dense.total_params == 30 * 8 * 576  # the routers
    # Two steps of continual pre-training, or of distillation from the dense model, already pull the random
    # split back toward a language model; the carve stays one under distillation.
    assert trained.perplexity < split.perplexity / 10 and distilled.perplexity < split.perplexity / 10
    assert dense.perplexity < carved_distilled.perplexity < 2 * carved.perplexity
    assert (tmp_path / "random-split-cpt" / "metrics.jsonl").is_file()
    for run in ("random-split-distill", "carve-distill"):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["kd_loss"]) and r["teacher_ce"] < r["loss"] for r in records if "kd_loss" in r)
    table = format_rows(rows, "p")
    assert "upcycle 8x top-2" in table and "carve 12/top-4+shared (50% active)" in table
    assert "random-split 8/top-2 s=4 + CPT 4k tok" in table and "random-split 8/top-2 s=4 + distill 4k tok" in table


def test_inspect_smollm2(capsys):
    assert main(["inspect", "smollm2-135m", "--num-experts", "16", "--top-k", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["family"], report["output_architecture"]) == ("llama", "MixtralForCausalLM")
    assert (report["num_layers"], report["hidden_size"], report["ffn_size"]) == (30, 576, 1536)
    split = next(plan for plan in report["plans"] if plan["method"] == "random-split")
    assert split["expert_size"] == 96 and split["problem"] is None
    ffn = 30 * 3 * 576 * 1536
    assert split["active_params"] == report["params"] - ffn + ffn // 4 + 30 * 16 * 576
