"""Corpus readers, packing, caching and the domain sampler."""

import json

import numpy as np
import pytest

from moeify.data.embedded import pydoc_topics
from moeify.data.packed import PackedDataset
from moeify.data.prepare import PrepareConfig, prepare
from moeify.data.sampler import DomainSampler, static_weights
from moeify.data.sources import Source, read_documents
from moeify.errors import MoeifyError

TEXTS = pydoc_topics(heldout=False)[:30]


def test_every_reader_gives_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    (tmp_path / "folder").mkdir()
    for i, text in enumerate(TEXTS):
        (tmp_path / "folder" / f"{i:03d}.txt").write_text(text)
    (tmp_path / "folder" / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    with open(tmp_path / "docs.jsonl", "w") as f:
        for text in TEXTS:
            f.write(json.dumps({"text": text, "meta": 1}) + "\n")
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "docs.parquet")
    Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "hf"))
    for path in ("folder", "docs.jsonl", "docs.parquet", "hf"):
        assert list(read_documents(Source("d", tmp_path / path))) == TEXTS, path


def test_bad_sources(tmp_path):
    with pytest.raises(MoeifyError, match="DOMAIN=PATH"):
        Source.parse("just-a-path")
    with pytest.raises(MoeifyError, match="does not exist"):
        Source.parse(f"web={tmp_path / 'missing'}")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(MoeifyError, match="bad.jsonl:2 has no string field 'text'"):
        list(read_documents(Source("d", tmp_path / "bad.jsonl")))


def test_prepare_packs_splits_and_reuses_cache(tiny_moe, tmp_path):
    with open(tmp_path / "a.jsonl", "w") as f:
        for text in TEXTS:
            f.write(json.dumps({"text": text}) + "\n")
    config = PrepareConfig(str(tiny_moe), sources=[f"prose={tmp_path / 'a.jsonl'}", f"more={tmp_path / 'a.jsonl'}"],
                           out=tmp_path / "data", seq_len=64)
    data = prepare(config, progress=False)
    assert data.domains == ["more", "prose"]
    info = data.meta["domains"]["prose"]
    assert info["documents"] == 30 and info["train_blocks"] > 10 and info["val_blocks"] >= 1
    block = data.block("prose", 0)
    assert block.shape == (64,) and int(block.max()) < 320
    stamp = (tmp_path / "data" / "prose.train.bin").stat().st_mtime_ns
    assert prepare(config, progress=False).path == data.path
    assert (tmp_path / "data" / "prose.train.bin").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(MoeifyError, match="not a prepared data directory"):
        PackedDataset(tmp_path)


def test_sampler_is_deterministic_follows_weights_and_resumes():
    counts = {"a": 50, "b": 30, "c": 20}
    weights = static_weights("a=0.7,b=0.2,c=0.1", counts)
    first, second = DomainSampler(counts, weights, seed=3), DomainSampler(counts, weights, seed=3)
    draws = first.draw(2000)
    assert draws == second.draw(2000)
    share = {d: sum(1 for x, _ in draws if x == d) / len(draws) for d in counts}
    assert abs(share["a"] - 0.7) < 0.04 and abs(share["c"] - 0.1) < 0.03
    # Each domain's first epoch visits every block once.
    assert sorted([i for d, i in draws if d == "c"][:20]) == list(range(20))
    state = first.state_dict()
    resumed = DomainSampler(counts, weights, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.draw(50) == first.draw(50)
    assert DomainSampler(counts, weights, seed=4).draw(50) != DomainSampler(counts, weights, seed=3).draw(50)


def test_static_weight_specs():
    counts = {"commoncrawl": 1, "c4": 1, "github": 1, "wikipedia": 1, "book": 1, "arxiv": 1, "stackexchange": 1}
    assert static_weights("sheared-llama", counts)["c4"] == pytest.approx(0.492, abs=1e-3)
    assert static_weights("proportional", {"a": 3, "b": 1}) == {"a": 0.75, "b": 0.25}
    with pytest.raises(MoeifyError, match="needs the domains"):
        static_weights("llama", {"code": 1})
    with pytest.raises(MoeifyError, match="each of: a, b"):
        static_weights("a=1", {"a": 1, "b": 1})
    assert np.isclose(sum(static_weights("uniform", {"a": 1, "b": 1}).values()), 1)
