"""`moeify data prepare`: read sources, tokenise with the model's tokenizer, pack per domain."""

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from tqdm import tqdm

from moeify.checkpoint.atomic import atomic_directory, check_output
from moeify.checkpoint.resolve import DEFAULT_MODEL, cache_dir, resolve_model
from moeify.data.embedded import embedded_corpus
from moeify.data.packed import META, PackedDataset
from moeify.data.sources import Source, read_documents
from moeify.data.text import (
    HELDOUT_EVERY,
    document_separator,
    load_tokenizer,
    split_heldout,
    tokenize_joined,
)
from moeify.errors import MoeifyError
from moeify.json_file import read_json
from moeify.schema import at_least

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json")


@dataclass
class PrepareConfig:
    RANGES: ClassVar[dict] = {"seq_len": at_least(2), "embedded_chars": at_least(1)}
    model: str = DEFAULT_MODEL
    """Model whose tokenizer is used (directory, .gguf or embedded name)."""
    sources: list[str] = field(default_factory=list)
    """DOMAIN=PATH: a text file or folder, .jsonl, .parquet or saved HF dataset; repeat per domain (default: the embedded corpus)."""
    out: Path | None = None
    """Output directory; default: a cache directory named by the inputs' fingerprint."""
    seq_len: int = 512
    """Tokens per packed block."""
    embedded_chars: int = 2_000_000
    """Characters per domain of the embedded corpus."""
    force: bool = False
    """Replace --out if it holds data moeify prepared from other inputs."""


def run_prepare(config: PrepareConfig) -> str:
    dataset = prepare(config)
    lines = []
    for domain in dataset.domains:
        info = dataset.meta["domains"][domain]
        lines.append(f"{domain:<16} {info['documents']:>7} docs {info['train_tokens']:>11} train tokens {info['val_tokens']:>9} held-out")
    return "\n".join([*lines, f"wrote {dataset.path}"])


def tokenizer_fingerprint(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode() + (model_dir / name).read_bytes())
    return digest.hexdigest()


def _source_fingerprint(sources: list[Source]) -> str:
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.domain.encode())
        for file in source.files():
            stat = file.stat()
            digest.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def prepare(config: PrepareConfig, progress: bool = True) -> PackedDataset:
    if config.seq_len < 2:
        raise MoeifyError(f"--seq-len must be at least 2, got {config.seq_len}")
    model_dir = resolve_model(config.model)
    sources = [Source.parse(spec) for spec in config.sources]
    reads = [Path(config.model), model_dir, *(source.path for source in sources)]
    key = {
        "format": FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint(model_dir),
        "seq_len": config.seq_len,
        "sources": _source_fingerprint(sources) if sources else f"embedded:{sys.version_info[:2]}:{config.embedded_chars}",
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    out = config.out or cache_dir() / "data" / fingerprint[:16]
    if (out / META).is_file() and _recorded_fingerprint(out) == fingerprint:
        return PackedDataset(out)
    if config.out is not None:
        check_output(out, config.force, reads)  # before the work (atomic_directory checks again at the end)

    tokenizer = load_tokenizer(model_dir)
    eos = document_separator(tokenizer)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    if sources:
        documents: dict[str, list[str]] = {}
        for source in sources:
            documents.setdefault(source.domain, []).extend(read_documents(source))
    else:
        documents = embedded_corpus(config.embedded_chars)

    meta = {"fingerprint": fingerprint, "key": key, "seq_len": config.seq_len, "dtype": np.dtype(dtype).name,
            "tokenizer": {"model": str(model_dir), "fingerprint": key["tokenizer"], "vocab_size": len(tokenizer), "eos": eos},
            "domains": {}}
    with atomic_directory(out, config.force, reads, "data prepare", cache=config.out is None) as tmp:
        for domain in tqdm(sorted(documents), desc="tokenise", unit="domain", disable=not progress, file=sys.stderr):
            docs = documents[domain]
            if not docs:
                raise MoeifyError(f"domain {domain!r} has no text; check its source (empty files are skipped)")
            split = _split_documents(tokenizer, docs)
            meta["domains"][domain] = {"documents": len(docs)}
            for name, tokens in split.items():
                blocks = len(tokens) // config.seq_len
                if blocks == 0:
                    raise MoeifyError(
                        f"domain {domain!r} has {len(tokens)} {name} tokens, fewer than one block of --seq-len "
                        f"{config.seq_len}; add text to it or lower --seq-len"
                    )
                np.asarray(tokens[: blocks * config.seq_len], dtype=dtype).tofile(tmp / f"{domain}.{name}.bin")
                meta["domains"][domain][f"{name}_blocks"] = blocks
                meta["domains"][domain][f"{name}_tokens"] = blocks * config.seq_len
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return PackedDataset(out)


def _split_documents(tokenizer, docs: list[str]) -> dict[str, list[int]]:
    """Held-out split: the held-out documents (data/text.py) when there are at least HELDOUT_EVERY,
    else the last 1/HELDOUT_EVERY of the tokens."""
    if len(docs) >= HELDOUT_EVERY:
        training, heldout = split_heldout(docs)
        return {"train": tokenize_joined(tokenizer, training), "val": tokenize_joined(tokenizer, heldout)}
    flat = tokenize_joined(tokenizer, docs)
    cut = len(flat) - len(flat) // HELDOUT_EVERY
    return {"train": flat[:cut], "val": flat[cut:]}


def _recorded_fingerprint(out: Path) -> str | None:
    """The fingerprint a prepared directory records; None when its meta.json is damaged (prepared again)."""
    try:
        return read_json(out / META, "").get("fingerprint")
    except MoeifyError:
        return None
