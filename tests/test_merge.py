"""mergekit-moe's features: Branch-Train-MiX from several fine-tunes, routers from prompts or calibration domains."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeify.build import build, build_config
from moeify.cli import main
from tests.conftest import TINY_CONFIGS, save_tiny

# Prompt sets of the tiny tokenizer that share few tokens: digits, upper-case words, lower-case prose.
PROMPTS = [
    {"positive": ["0123 4567 8901 2345", "98 76 54 32 10 11 22 33"]},
    {"positive": ["THE QUICK BROWN FOX JUMPS", "HELLO WORLD AND GOOD NIGHT"]},
    {"positive": ["the module is imported once and cached", "a function returns the value of its last statement"]},
]


def fine_tune(base: Path, out: Path, seed: int, std: float = 0.02) -> Path:
    """A stand-in for a fine-tune of `base`: every weight moved by relative noise (tokenizer and config kept)."""
    out.mkdir()
    for file in base.iterdir():
        if file.suffix != ".safetensors":
            (out / file.name).write_bytes(file.read_bytes())
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(base / "model.safetensors")
    save_file({name: t + torch.randn(t.shape, generator=generator) * std * t.std() for name, t in tensors.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def fine_tunes(tiny_models, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("fine-tunes")
    return [fine_tune(tiny_models["llama"], root / f"ft{seed}", seed) for seed in (1, 2)]


def test_btx_of_identical_models_is_upcycling_byte_for_byte(tiny_models, tmp_path):
    dense = str(tiny_models["llama"])
    upcycled = build(build_config(model=dense, out=tmp_path / "up", method="upcycle", num_experts=3, router_std=0.1), progress=False)
    btx = build(build_config(model=dense, out=tmp_path / "btx", method="btx", expert_model=[dense] * 3, router_std=0.1), progress=False)
    ours, theirs = load_file(btx / "model.safetensors"), load_file(upcycled / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_btx_experts_are_the_fine_tunes_ffns_and_the_rest_is_their_mean(tiny_models, fine_tunes, tmp_path):
    base = tiny_models["llama"]
    assert main(["build", str(base), "--out", str(tmp_path / "btx"), "--method", "btx", *sum((["--expert-model", str(f)] for f in fine_tunes), []),
                 "--layout", "fused"]) == 0
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "btx", dtype=torch.float32)
    assert moe.config.num_local_experts == 2 and moe.config.num_experts_per_tok == 2
    sources = [load_file(f / "model.safetensors") for f in fine_tunes]
    state = moe.state_dict()
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        for e, source in enumerate(sources):
            gate_up = torch.cat([source[f"{prefix}.mlp.gate_proj.weight"], source[f"{prefix}.mlp.up_proj.weight"]])
            assert torch.equal(state[f"{prefix}.mlp.experts.gate_up_proj"][e], gate_up)
            assert torch.equal(state[f"{prefix}.mlp.experts.down_proj"][e], source[f"{prefix}.mlp.down_proj.weight"])
        q = f"{prefix}.self_attn.q_proj.weight"
        torch.testing.assert_close(state[q], (sources[0][q] + sources[1][q]) / 2, rtol=0, atol=1e-7)
    torch.testing.assert_close(state["model.embed_tokens.weight"],
                               (sources[0]["model.embed_tokens.weight"] + sources[1]["model.embed_tokens.weight"]) / 2, rtol=0, atol=1e-7)

    # --merge-others base: attention and embeddings are MODEL's, as mergekit-moe does.
    assert main(["build", str(base), "--out", str(tmp_path / "based"), "--method", "btx", "--merge-others", "base",
                 *sum((["--expert-model", str(f)] for f in fine_tunes), [])]) == 0
    based = load_file(tmp_path / "based" / "model.safetensors")
    dense = load_file(base / "model.safetensors")
    assert torch.equal(based["model.layers.1.self_attn.q_proj.weight"], dense["model.layers.1.self_attn.q_proj.weight"])


def test_btx_online_is_bit_identical_to_build(tiny_models, fine_tunes, tiny_data, tmp_path):
    from tests.test_online import TRAIN_FLAGS, _assert_same_as_offline, _initial_weights
    from transformers import AutoConfig

    flags = ["--method", "btx", *sum((["--expert-model", str(f)] for f in fine_tunes), []), "--router-std", "0.1"]
    dense = str(tiny_models["llama"])
    assert main(["build", dense, "--out", str(tmp_path / "offline"), *flags]) == 0
    assert main(["train", "--from-dense", dense, "--data", str(tiny_data), "--out", str(tmp_path / "run"), *TRAIN_FLAGS, *flags,
                 "--stop-after-steps", "0"]) == 0
    _assert_same_as_offline(_initial_weights(tmp_path / "run", AutoConfig.from_pretrained(tmp_path / "offline")), tmp_path / "offline")


def _expert_choices(model_dir: Path, texts: list[str]) -> list[torch.Tensor]:
    """Per text: [layers, E] mean router probability of each expert over its tokens, in the stock model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for text in texts:
            logits = model(torch.tensor([tokenizer(text)["input_ids"]]), output_router_logits=True).router_logits
            out.append(torch.stack([layer.softmax(-1).mean(0) for layer in logits]))
    return out


def test_prompt_routers_route_each_prompt_set_to_its_expert(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump(PROMPTS))
    assert main(["build", str(tiny_models["llama"]), "--out", str(tmp_path / "moe"), "--num-experts", "3", "--top-k", "1",
                 "--router-init", "prompts", "--expert-prompts", str(prompts)]) == 0
    assert "router rows from 3 prompt sets" in capsys.readouterr().err
    for expert, entry in enumerate(PROMPTS):
        for probabilities in _expert_choices(tmp_path / "moe", entry["positive"]):
            assert (probabilities.argmax(dim=1) == expert).all(), (expert, probabilities)
    # An upcycled MoE routed by prompts still computes the dense model (every expert is the FFN).
    ids = torch.arange(1, 30)[None]
    dense = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rule", ["fit", "centred", "mergekit"])
def test_negative_prompts_move_the_router_away(rule, tiny_models, tmp_path):
    """Expert 0's negatives are expert 1's prompts: expert 0 must get less of those prompts' routing weight."""
    def weight_of_expert_0(entries: list[dict], name: str) -> float:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(entries))
        build(build_config(model=str(tiny_models["llama"]), out=tmp_path / name, num_experts=3, router_init="prompts",
                          expert_prompts=path, text_router_rule=rule), progress=False)
        return torch.stack(_expert_choices(tmp_path / name, PROMPTS[1]["positive"]))[..., 0].mean().item()

    negative = [{**PROMPTS[0], "negative": PROMPTS[1]["positive"]}, PROMPTS[1], PROMPTS[2]]
    assert weight_of_expert_0(negative, "with-negatives") < weight_of_expert_0(PROMPTS, "without")


def test_calibration_router_sends_each_domain_to_its_expert(tiny_models, tmp_path, capsys):
    texts = {"digits": " ".join(str(i * 7919 % 10000) for i in range(3000)), "shout": " ".join(["HELLO WORLD QUICK BROWN FOX"] * 400)}
    sources = []
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
        sources.append(f"{name}={tmp_path / f'{name}.txt'}")
    assert main(["build", str(tiny_models["llama"]), "--out", str(tmp_path / "moe"), "--num-experts", "2", "--top-k", "1",
                 "--router-init", "calibration", "--calibration", ",".join(sources), "--calibration-tokens", "1024",
                 "--calibration-seq-len", "64"]) == 0
    assert "0: digits, 1: shout" in capsys.readouterr().err
    digits, shout = _expert_choices(tmp_path / "moe", ["4821 9035 1177 6203", "QUICK BROWN HELLO FOX WORLD"])
    assert (digits.argmax(dim=1) == 0).all() and (shout.argmax(dim=1) == 1).all()


def test_prompt_routers_refused_online(tiny_models, tiny_data, tmp_path, capsys):
    from tests.test_online import TRAIN_FLAGS

    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump(PROMPTS))
    assert main(["train", "--from-dense", str(tiny_models["llama"]), "--data", str(tiny_data), "--out", str(tmp_path / "run"), *TRAIN_FLAGS,
                 "--num-experts", "3", "--router-init", "prompts", "--expert-prompts", str(prompts)]) == 2
    assert "`moeify build` the MoE once" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unrelated_model_of_the_same_shape_is_not_a_fine_tune(tiny_models, tmp_path, capsys):
    other = save_tiny(TINY_CONFIGS["llama"](), tmp_path / "other", seed=7)
    assert main(["build", str(tiny_models["llama"]), "--out", str(tmp_path / "out"), "--method", "btx",
                 "--expert-model", str(tiny_models["llama"]), "--expert-model", str(other)]) == 2
    assert "does not share MODEL's base: their token embeddings have cosine" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_text_router_rules(tiny_models, tmp_path):
    """mergekit's rule: unit rows of the mean MLP inputs. centred: rows orthogonal to the experts' common centre,
    which mergekit's rows are dominated by (their pairwise cosines are near 1)."""
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump(PROMPTS))
    rows = {}
    for rule in ("mergekit", "centred"):
        out = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / rule, num_experts=3, expert_prompts=prompts,
                                 text_router_rule=rule), progress=False)
        state = load_file(out / "model.safetensors")
        rows[rule] = [state[f"model.layers.{layer}.block_sparse_moe.gate.weight"] for layer in range(2)]
    for mergekit, centred in zip(rows["mergekit"], rows["centred"]):
        torch.testing.assert_close(mergekit.norm(dim=1), torch.ones(3))
        centre = torch.nn.functional.normalize(mergekit.sum(0), dim=0)  # the unit means' sum points along their centre
        assert (mergekit @ centre).min() > 0.5
        cosines = torch.nn.functional.normalize(centred, dim=1) @ torch.nn.functional.normalize(centred, dim=1).T
        assert cosines.triu(1).max() < 0.5


def test_fitted_rows_are_the_least_squares_solution(tiny_models, tmp_path):
    """The fit's rows against a direct weighted ridge regression on the MLP inputs of the prompt tokens."""
    from moeify.construct.text_router import FIT_RIDGE

    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump(PROMPTS))
    out = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "fit", num_experts=3, expert_prompts=prompts),
                progress=False)
    row_0 = load_file(out / "model.safetensors")["model.layers.0.block_sparse_moe.gate.weight"].double()
    dense = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    xs, weights, targets = [], [], []
    captured = []
    dense.model.layers[0].mlp.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0][0]))
    for expert, entry in enumerate(PROMPTS):
        captured.clear()
        with torch.no_grad():
            for prompt in entry["positive"]:
                dense(torch.tensor([tokenizer(prompt)["input_ids"]]))
        x = torch.cat(captured)
        xs.append(x)
        weights.append(torch.full((len(x),), 1 / len(x), dtype=torch.float64))
        targets.append((torch.eye(3, dtype=torch.float64)[expert] - 1 / 3).expand(len(x), 3))
    x, w, t = torch.cat(xs), torch.cat(weights), torch.cat(targets)
    gram = (x * w[:, None]).T @ x
    solution = torch.linalg.solve(gram + FIT_RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64),
                                  (x * w[:, None]).T @ t).T
    # The built rows are the solution scaled to unit logit std: the same up to one positive factor.
    factor = (row_0 * solution).sum() / (solution * solution).sum()
    assert factor > 0
    torch.testing.assert_close(row_0, factor * solution, rtol=1e-4, atol=1e-5)


def test_a_btx_partition_file_works_from_another_directory(tiny_models, fine_tunes, tmp_path, monkeypatch):
    import shutil

    for f in fine_tunes:
        shutil.copytree(f, tmp_path / f.name)
    monkeypatch.chdir(tmp_path)  # the expert models given as relative paths
    relative = sum((["--expert-model", f.name] for f in fine_tunes), [])
    assert main(["split", "--model", str(tiny_models["llama"]), "--out", "p.safetensors", "--method", "btx", *relative]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["build", str(tiny_models["llama"]), "--partition", str(tmp_path / "p.safetensors"), "--out", "moe"]) == 0
    absolute = sum((["--expert-model", str(tmp_path / f.name)] for f in fine_tunes), [])
    assert main(["build", str(tiny_models["llama"]), "--out", "direct", "--method", "btx", *absolute]) == 0
    ours, theirs = load_file(elsewhere / "moe" / "model.safetensors"), load_file(elsewhere / "direct" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_routing_samples_spread_over_every_text(tiny_models, monkeypatch):
    """The tokens kept to scale the rows and report the routing are every stride-th over all of a set's
    texts (not the first texts' first tokens), at most SAMPLE_TOKENS of them, at the right positions."""
    from tqdm import tqdm

    from moeify.construct import text_router

    monkeypatch.setattr(text_router, "SAMPLE_TOKENS", 10)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    texts = [list(range(5, 5 + n)) for n in (7, 12, 6)]  # 25 tokens: stride 3, positions 0, 3, ..., 24
    with tqdm(disable=True) as bar:
        record = text_router._run(model, texts, bar)
    captured = []
    model.model.layers[1].mlp.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0][0]))
    with torch.no_grad():
        for ids in texts:
            model.model(torch.tensor([ids]), use_cache=False)
    everything = torch.cat(captured)
    torch.testing.assert_close(torch.cat(record.samples[1]), everything[::3].float())
    assert len(torch.cat(record.samples[1])) == 9 and record.count == 25


def test_a_json_prompt_file_with_escaped_surrogate_pairs_reads_as_characters(tmp_path):
    from moeify.construct.text_router import read_expert_prompts

    prompts = tmp_path / "prompts.json"
    prompts.write_text('[{"positive": ["smile \\ud83d\\ude00"]}, {"positive": ["plain"], "negative": ["\\u00e9t\\u00e9"]}]')
    assert read_expert_prompts(prompts, 2) == [(["smile \U0001F600"], []), (["plain"], ["été"])]
