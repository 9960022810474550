"""moeify's block inside stock transformers models: same logits, and a lossless round trip to disk."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeify.build import build, build_config
from moeify.checkpoint.writer import ShardedWriter
from moeify.modeling.hf import attach_moe_blocks, stock_state_dict
from tests.conftest import logits_of

INPUT_IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "llama-tied"])
def test_attached_blocks_match_stock_and_round_trip(family, tiny_models, tmp_path):
    moe_dir = build(build_config(model=str(tiny_models[family]), out=tmp_path / "moe", method="random-split", num_experts=4, top_k=2, router_std=0.5), progress=False)
    stock_logits = logits_of(moe_dir, INPUT_IDS)
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    blocks = attach_moe_blocks(model, dispatch="loop")
    assert len(blocks) == 2
    with torch.no_grad():
        ours = model(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(ours, stock_logits, rtol=1e-5, atol=1e-5)
    assert blocks[0].last.load_E.sum() == INPUT_IDS.numel() * 2

    # Write back in the stock layout, reload with stock transformers: same logits.
    out = tmp_path / "again"
    out.mkdir()
    writer = ShardedWriter(out)
    for name, tensor in stock_state_dict(model.state_dict(), model.config).items():
        writer.add(name, tensor)
    writer.close()
    model.config.save_pretrained(out)
    torch.testing.assert_close(logits_of(out, INPUT_IDS), stock_logits, rtol=1e-5, atol=1e-5)
