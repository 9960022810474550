"""moeify eval / report / generate and the lm-eval bridge, on tiny models."""

import base64
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from moeify.build import build, build_config
from moeify.cli import main
from moeify.errors import MoeifyError
from moeify.evaluate.lm_eval_bridge import run_lm_eval
from moeify.evaluate.report import build_report
from moeify.evaluate.run import EvalConfig, evaluate
from moeify.train.loop import train
from tests.conftest import COMMON, save_tiny, train_config

DOC = "The for statement is used to iterate over the elements of a sequence (such as a string, tuple or list)."


@pytest.fixture()
def text_source(tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text(DOC)
    return f"prose={tmp_path / 'text'}"


def test_perplexity_equals_direct_transformers_computation(tiny_models, text_source, tmp_path):
    report = evaluate(EvalConfig([str(tiny_models["llama"])], tmp_path / "eval", [text_source], seq_len=512), progress=False)
    score = report["models"][0]["domains"]["prose"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer(DOC, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        loss = F.cross_entropy(model(input_ids=ids[:, :-1]).logits[0], ids[0, 1:]).item()
    assert score["tokens"] == ids.shape[1] - 1 and score["bytes"] == len(DOC.encode())
    assert score["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert score["bits_per_byte"] == pytest.approx(loss * score["tokens"] / score["bytes"] / math.log(2), rel=1e-5)


def test_bits_per_byte_compares_models_with_different_tokenizers(tiny_models, text_source, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A character-level tokenizer: a different vocabulary and many more tokens than the BPE one.
    chars = sorted(set(DOC)) + ["<eos>"]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    other = save_tiny(LlamaConfig(**{**COMMON, "vocab_size": len(chars)}), tmp_path / "charlm")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(other)
    report = evaluate(EvalConfig([str(tiny_models["llama"]), str(other)], tmp_path / "eval", [text_source]), progress=False)
    bpe, char = (m["domains"]["prose"] for m in report["models"])
    assert char["tokens"] > 1.5 * bpe["tokens"] and bpe["bytes"] == char["bytes"] == len(DOC.encode())
    for score, vocab in ((bpe, 320), (char, len(chars))):
        # An untrained model is near uniform: about log2(vocab) bits per token.
        expected = math.log2(vocab) * score["tokens"] / score["bytes"]
        assert 0.7 * expected < score["bits_per_byte"] < 1.3 * expected


def test_routing_statistics_of_a_hand_set_router(tiny_models, text_source, tmp_path):
    # A zero router with k = E: every token picks every expert, router entropy is ln E.
    moe = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "moe", method="random-split", num_experts=4, top_k=4, router_std=0.0, scale=4.0), progress=False)
    report = evaluate(EvalConfig([str(moe), str(moe)], tmp_path / "eval", [text_source]), progress=False)
    routing = report["models"][0]["routing"]["prose"]
    tokens = report["models"][0]["domains"]["prose"]["tokens"]
    assert routing["tokens"] == tokens
    assert routing["share"] == [[0.25] * 4] * 2
    assert routing["co_selection"] == [[[1.0] * 4] * 4] * 2
    assert routing["router_entropy"] == pytest.approx([math.log(4)] * 2)
    assert report["top_expert_change"][0]["per_domain"]["prose"] == [0.0, 0.0]
    assert (tmp_path / "eval" / "routing-0-moe.png").stat().st_size > 1000
    assert "0-moe,prose,1,3,0.250000" in (tmp_path / "eval" / "routing.csv").read_text()


def test_report_renders_with_plots(tiny_moe, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(train_config(tiny_moe, tiny_data, run, max_tokens=8 * 32 * 4, eval_every=2, export=True), progress=False)
    assert main(["eval", str(tiny_moe), str(run), "--out", str(run / "eval"), "--max-tokens", "256", "--seq-len", "64"]) == 0
    page = build_report(run).read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    names = [name for name, _ in images]
    assert {"loss", "heldout", "weights", "load", "entropy", "routing-0-llama-moe", "routing-1-run"} <= set(names)
    for _, data in images:
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert "bits per byte" in page and "top expert changed 0-llama-moe -&gt; 1-run" in page
    summary = page[:page.index("<img")]  # the run in one table before any plot
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "heldout_loss" in r][-1]
    for domain, loss in final["heldout_loss"].items():
        assert f"held-out {domain}, step {final['step']}" in summary and f"perplexity {math.exp(loss):,.2f}" in summary
    last_step = [r for r in records if "loss" in r][-1]
    assert f"{last_step['tokens']:,}" in summary and "tokens/s" in summary and f"{last_step['loss']:.4f}" in summary
    # a run killed mid-line (the last metrics line cut short) still reports, without that line
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "lo')
    assert "bits per byte" in build_report(run, out=tmp_path / "again.html").read_text()


def test_lm_eval_bridge_runs_a_local_multiple_choice_task(tiny_models, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": "Two plus two is", "choices": ["four", "blue", "cat"], "answer": 0},
            {"question": "The sky is", "choices": ["loud", "blue", "seven"], "answer": 1}]
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'data.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    upcycled = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "moe", method="upcycle", num_experts=4), progress=False)
    dense_scores = run_lm_eval(str(tiny_models["llama"]), ["tiny_mc"], include=tasks)["tiny_mc"]
    moe_scores = run_lm_eval(str(upcycled), ["tiny_mc"], include=tasks)["tiny_mc"]
    # The upcycled MoE is the dense model at init: the harness must pick the same answers for both.
    assert moe_scores == dense_scores
    assert dense_scores["acc,none"] * len(rows) in (0, 1, 2)  # a mean over exactly the two questions
    with pytest.raises(MoeifyError, match="lm-eval has no task no_such_task"):
        run_lm_eval(str(tiny_models["llama"]), ["no_such_task"], include=tasks)


def _one_line_error(capsys, argv, fragment):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moeify: error: ") and fragment in err, err


def test_bad_inputs(capsys, tiny_models, tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.txt").write_text("hello")
    _one_line_error(capsys, ["eval", str(tmp_path / "notamodel"), "--out", str(tmp_path / "e1")], "is not a model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    _one_line_error(capsys, ["eval", str(tiny_models["llama"]), "--source", f"web={tmp_path / 'empty'}", "--out", str(tmp_path / "e2")],
                    "no text found for domain(s) web")
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()
    _one_line_error(capsys, ["report", str(tmp_path)], "has no metrics.jsonl")


def test_generate_is_greedy_decoding_of_the_model(capsys, tiny_models):
    assert main(["generate", str(tiny_models["llama"]), "--prompt", "def", "--max-new-tokens", "5"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    ids = tokenizer("def", return_tensors="pt")["input_ids"]
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)
    assert capsys.readouterr().out.strip() == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_heatmap_titles_do_not_overlap(tmp_path, monkeypatch):
    from moeify.evaluate import plots

    boxes = []
    save = plots._save

    def measuring_save(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes.extend(text.get_window_extent(renderer) for text in [fig._suptitle, *(ax.title for ax in fig.axes if ax.get_title())])
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", measuring_save)
    shares = [[0.25, 0.25, 0.25, 0.25]] * 30
    plots.expert_share_heatmaps({"step 1": shares, "step 128": shares}, "training batch: share of each expert", tmp_path / "load.png")
    assert len(boxes) == 3
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
