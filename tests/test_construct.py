"""Construction methods (issue: partitions, granular/drop upcycling, router variants, exports)."""

import json

import pytest
import torch
from conftest import logits_of
from safetensors.torch import load_file

from moeify.build import build, build_config
from moeify.checkpoint.dense import DenseCheckpoint
from moeify.cli import main
from moeify.construct import ConstructionConfig, ConstructionPlan, Partition
from moeify.construct.kmeans import balanced_kmeans
from moeify.errors import MoeifyError
from moeify.modeling.load import load_moe_model
from moeify.schema import from_flat

CALIBRATION = dict(calibration="embedded", calibration_tokens=2048, calibration_seq_len=64)
INDEPENDENT = ["random-split", "clustering", "co-activation", "gradient-greedy"]
IDS = torch.randint(320, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def partitions(tiny_models) -> dict[str, Partition]:
    dense = DenseCheckpoint(tiny_models["llama"])
    methods = INDEPENDENT + ["sharing-inner", "sharing-inter"]
    def partition(method: str) -> Partition:
        settings = dict(method=method, num_experts=4, **({"shared_size": 16} if method == "sharing-inter" else {}),
                        **(CALIBRATION if method not in ("random-split", "clustering") else {}))
        return ConstructionPlan.make(dense, from_flat(ConstructionConfig, settings), progress=False).make_partition(dense)

    return {m: partition(m) for m in methods}


@pytest.mark.parametrize("method", INDEPENDENT)
def test_independent_methods_hold_every_neuron_exactly_once(partitions, method):
    partition = partitions[method]
    for experts in partition.experts:
        assert experts.shape == (4, 24)
        assert torch.equal(experts.flatten().sort().values, torch.arange(96))


def test_sharing_methods_have_the_sizes_asked_and_a_disjoint_shared_block(partitions):
    inner = partitions["sharing-inner"]
    assert all(e.shape == (4, 24) and len(s) == 0 for e, s in zip(inner.experts, inner.shared))
    inter = partitions["sharing-inter"]
    assert inter.shared_size == 16 and inter.expert_size == 20  # (96 - 16) / 4
    for experts, shared in zip(inter.experts, inter.shared):
        assert len(shared) == 16 and experts.shape == (4, 20)
        routed = experts.flatten()
        assert not set(routed.tolist()) & set(shared.tolist())
        assert torch.equal(torch.cat([routed, shared]).sort().values, torch.arange(96))  # routed tile the rest


def test_coactivation_graphs_by_chunks_of_layers_equal_all_layers_at_once(tiny_models, partitions, monkeypatch):
    from moeify.construct import calibration as calib
    from moeify.construct import splits

    path = tiny_models["llama"]
    model = calib.load_dense_model(path)
    data = calib.load_calibration("embedded", path, 1024, 64)
    every = calib.coactivation_graphs(model, data)
    top_layer_runs = []
    model.model.layers[-1].register_forward_pre_hook(lambda module, args: top_layer_runs.append(1))
    first = calib.coactivation_graphs(model, data, layers=[0])
    assert list(first) == [0] and torch.equal(first[0], every[0])
    assert top_layer_runs == []  # the forward stopped after layer 0
    assert calib.layer_chunks(5, 10, 25) == [range(0, 2), range(2, 4), range(4, 5)]
    assert calib.layer_chunks(3, 10, 5) == [range(0, 1), range(1, 2), range(2, 3)]  # one layer even over the budget
    # A budget of one graph: a calibration pass per layer, the same partition as one pass for all.
    monkeypatch.setattr(splits, "GRAPH_MEMORY_BYTES", 96 * 96 * 4)
    dense = DenseCheckpoint(path)
    settings = dict(method="co-activation", num_experts=4, **CALIBRATION)
    chunked = ConstructionPlan.make(dense, from_flat(ConstructionConfig, settings), progress=False).make_partition(dense)
    assert all(torch.equal(a, b) for a, b in zip(chunked.experts, partitions["co-activation"].experts, strict=True))


@pytest.mark.parametrize("method", ["random-split", "clustering", "gradient-greedy"])
def test_partition_files_are_deterministic_under_a_seed(tiny_models, tmp_path, method):
    files = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        files[name] = tmp_path / f"{name}.safetensors"
        calibration = ["--calibration", "embedded", "--calibration-tokens", "2048", "--calibration-seq-len", "64"]
        assert main(["split", str(tiny_models["llama"]), "--method", method, "--num-experts", "4", "--seed", str(seed),
                     *(calibration if method == "gradient-greedy" else []), "--out", str(files[name])]) == 0
    assert files["a"].read_bytes() == files["b"].read_bytes()
    assert Partition.load(files["a"]).experts[0].tolist() != Partition.load(files["c"]).experts[0].tolist()


def test_build_from_a_partition_file_uses_its_groups(tiny_models, tmp_path, partitions):
    path = partitions["clustering"].save(tmp_path / "p.safetensors")
    out = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "moe", partition=path, top_k=2), progress=False)
    tensors = load_file(out / "model.safetensors")
    dense_up = DenseCheckpoint(tiny_models["llama"]).get("model.layers.1.mlp.up_proj.weight")
    neurons = partitions["clustering"].experts[1][2]
    assert torch.equal(tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"], dense_up[neurons])
    manifest = json.loads((out / "moeify.json").read_text())
    assert manifest["method"] == "clustering" and manifest["num_experts"] == 4 and manifest["scale"] == 2.0


def test_balanced_kmeans_recovers_planted_equal_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 5
    points = centres.repeat_interleave(30, dim=0) + torch.randn(120, 16, generator=generator) * 0.3
    result = balanced_kmeans(points[torch.randperm(120, generator=generator)], 4, seed=0)
    assert torch.bincount(result.labels_N).tolist() == [30] * 4
    assert result.objective < 120 * 16 * 0.3 ** 2 * 1.5  # every point sits with its own centre


def test_drop_upcycle_with_ratio_zero_equals_upcycle(tiny_models, tmp_path):
    upcycle = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "u", method="upcycle", num_experts=4), progress=False)
    drop0 = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "d0", method="drop-upcycle", num_experts=4,
                              drop_ratio=0.0), progress=False)
    assert (upcycle / "model.safetensors").read_bytes() == (drop0 / "model.safetensors").read_bytes()
    drop = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "d", method="drop-upcycle", num_experts=4,
                             drop_ratio=0.5), progress=False)
    up, dropped = load_file(upcycle / "model.safetensors"), load_file(drop / "model.safetensors")
    key = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"
    changed = [(~(dropped[key.format(e)] == up[key.format(e)]).all(dim=1)).sum().item() for e in range(4)]
    assert changed == [48] * 4  # exactly r * F rows re-drawn in every expert
    assert not torch.equal(dropped[key.format(0)], dropped[key.format(1)])  # independently per expert


def test_noise_upcycle_breaks_symmetry_by_the_asked_amount(tiny_models, tmp_path):
    out = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "n", method="noise-upcycle", num_experts=4,
                            noise_std=0.1), progress=False)
    tensors = load_file(out / "model.safetensors")
    dense = DenseCheckpoint(tiny_models["llama"]).get("model.layers.0.mlp.gate_proj.weight")
    noise = tensors["model.layers.0.block_sparse_moe.experts.3.w1.weight"] - dense
    assert noise.std().item() == pytest.approx(0.1 * dense.std().item(), rel=0.1)


def _logits(path):
    model, _ = load_moe_model(path)
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_granular_upcycle_top_k_equal_to_granularity_reproduces_dense(tiny_models, tmp_path):
    out = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "g", method="granular-upcycle", num_experts=8,
                            granularity=4, top_k=4), progress=False)
    router = load_file(out / "model.safetensors")["model.layers.0.block_sparse_moe.gate.weight"]
    assert torch.equal(router[0], router[3]) and not torch.equal(router[3], router[4])  # virtual groups of G rows
    assert (logits_of(out, IDS) - logits_of(tiny_models["llama"], IDS)).abs().max() < 1e-4


def test_granular_weight_scaled_softmax_then_top_k_matches_the_predicted_scale(tiny_models, tmp_path):
    # With every expert selected, softmax-then-top-k weights are the probabilities p; slices of one
    # copy share p_c, sum_c G p_c = 1, so output = s * sum_c p_c * FFN = s/G * FFN. The formula's
    # s = copies * G^2 / k = G (k = E) predicts exactly the dense output: fp32 rounding only.
    out = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "g", method="granular-upcycle", num_experts=8,
                            granularity=4, top_k=8, routing="softmax-topk", renormalize=False, router_std=0.5), progress=False)
    manifest = json.loads((out / "moeify.json").read_text())
    assert manifest["scale"] == 4.0 and manifest["architecture"] == "Qwen2MoeForCausalLM"
    assert (logits_of(out, IDS) - logits_of(tiny_models["llama"], IDS)).abs().max() < 1e-4


EXPORTS = [
    ("llama", dict(method="random-split", shared_size=16), "Qwen2MoeForCausalLM"),
    ("llama", dict(method="random-split", routing="softmax-topk", renormalize=False), "Qwen2MoeForCausalLM"),
    ("qwen3", dict(method="random-split", routing="softmax-topk", renormalize=False), "Qwen3MoeForCausalLM"),
    ("llama", dict(method="random-split", routing="sigmoid-topk", shared_size=16), "Glm4MoeForCausalLM"),
    ("qwen2", dict(method="random-split", routing="sigmoid-topk"), "Glm4MoeForCausalLM"),
    ("qwen3", dict(method="random-split", routing="sigmoid-topk", shared_size=16), "Glm4MoeForCausalLM"),
]


@pytest.mark.parametrize("family,settings,architecture", EXPORTS, ids=[f"{f}-{a}-{i}" for i, (f, _, a) in enumerate(EXPORTS)])
def test_each_format_reloads_in_stock_transformers_with_moeify_logits(tiny_models, tmp_path, family, settings, architecture):
    out = build(build_config(model=str(tiny_models[family]), out=tmp_path / "m", num_experts=4, top_k=2, router_std=0.5, **settings),
                progress=False)
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    ours = _logits(out)
    assert (ours - logits_of(out, IDS)).abs().max() < 1e-4
    assert (ours - logits_of(tiny_models[family], IDS)).abs().max() > 1e-3  # a real split, not the dense model


def test_sigmoid_routed_upcycle_in_deepseek_v3_format_starts_at_dense(tiny_models, tmp_path):
    out = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "m", method="upcycle", num_experts=4,
                            routing="sigmoid-topk"), progress=False)
    assert (logits_of(out, IDS) - logits_of(tiny_models["llama"], IDS)).abs().max() < 1e-4


def test_mlp_gate_stays_in_moeify_format_and_export_refuses_it(tiny_models, tmp_path, capsys):
    out = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "m", method="random-split", num_experts=4,
                            gate="mlp", router_std=0.5), progress=False)
    assert json.loads((out / "moeify.json").read_text())["format"] == "moeify"
    model, blocks = load_moe_model(out)
    assert blocks[0].block.router.mlp_out is not None and torch.equal(blocks[0].block.router.mlp_out, torch.eye(4))
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(tmp_path / "exported")]) == 2
    error = capsys.readouterr().err
    assert "mlp gate" in error and error.count("\n") == 1
    assert not (tmp_path / "exported").exists()
    linear = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "l", method="random-split", num_experts=4),
                   progress=False)
    assert main(["export", str(linear), "--out", str(tmp_path / "exported")]) == 0
    assert (logits_of(tmp_path / "exported", IDS) - _logits(linear)).abs().max() < 1e-4


BAD_SPLITS = [
    (["--method", "random-split", "--experts", "200"], "larger than the FFN size"),
    (["--method", "sharing-inner", "--experts", "4"], "needs calibration text"),
    (["--method", "gradient-greedy", "--experts", "4", "--calibration", "embedded", "--calibration-tokens", "128",
      "--calibration-seq-len", "64"], "needs at least 8"),
    (["--method", "random-split", "--experts", "5"], "not divisible"),
]


@pytest.mark.parametrize("flags,message", BAD_SPLITS, ids=[m for _, m in BAD_SPLITS])
def test_bad_split_inputs_are_one_line_errors_and_write_nothing(tiny_models, tmp_path, capsys, flags, message):
    out = tmp_path / "p.safetensors"
    assert main(["split", str(tiny_models["llama"]), *flags, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_a_partition_of_another_model_is_refused(tiny_models, tmp_path, capsys):
    other = tmp_path / "p.safetensors"
    assert main(["split", str(tiny_models["qwen2"]), "--method", "random-split", "--experts", "4", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["build", "--model", str(tiny_models["llama"]), "--partition", str(other), "--out", str(tmp_path / "moe")]) == 2
    assert "made from another model" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


def test_compare_init_prints_dense_first_and_writes_a_chart(tiny_models, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare-init", str(tiny_models["llama"]), "--methods", "upcycle,random-split,clustering", "--experts", "4",
                 "--top-k", "2", "--eval-tokens", "512", "--out", str(out)]) == 0
    rows = json.loads((out / "compare-init.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "upcycle", "random-split", "clustering"]
    assert rows[1]["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=1e-4)  # upcycling starts at dense
    assert (out / "compare-init.png").read_bytes()[:4] == b"\x89PNG"
    assert "| dense |" in capsys.readouterr().out


def test_trained_selection_bias_survives_the_deepseek_v3_format(tiny_models, tmp_path):
    from moeify.checkpoint.writer import ShardedWriter
    from moeify.modeling.hf import stock_state_dict

    out = build(build_config(model=str(tiny_models["qwen2"]), out=tmp_path / "m", method="random-split", num_experts=4,
                            routing="sigmoid-topk", router_std=0.5), progress=False)
    model, blocks = load_moe_model(out)
    with torch.no_grad():
        for block in blocks:  # what aux-loss-free balancing leaves after training
            block.block.router.selection_bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.4]))
        ours = model.eval()(IDS).logits
    exported = tmp_path / "exported"
    exported.mkdir()
    writer = ShardedWriter(exported)
    for name, tensor in sorted(stock_state_dict(model.state_dict(), model.config).items()):
        writer.add(name, tensor)
    writer.close()
    model.config.save_pretrained(exported)
    assert (logits_of(exported, IDS) - ours).abs().max() < 1e-4
    assert (logits_of(out, IDS) - ours).abs().max() > 1e-4  # the bias changed the routing


def test_router_initialised_from_clustering_centroids(tiny_models, tmp_path, partitions):
    path = partitions["clustering"].save(tmp_path / "p.safetensors")
    out = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "moe", partition=path, router_init="centroids"),
                progress=False)
    router = load_file(out / "model.safetensors")["model.layers.1.block_sparse_moe.gate.weight"]
    assert torch.equal(router, partitions["clustering"].centroids[1])
    with pytest.raises(MoeifyError, match="centroids is not available with --method random-split"):
        build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "x", method="random-split", num_experts=4,
                          router_init="centroids"), progress=False)
    assert not (tmp_path / "x").exists()
