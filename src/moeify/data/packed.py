"""Tokenised corpora packed into fixed-length blocks: one memory-mapped token file per domain and split.

Layout of a prepared directory:
  meta.json                         seq_len, dtype, tokenizer fingerprint, per-domain counts
  DOMAIN.train.bin, DOMAIN.val.bin  flat token ids; block i is tokens[i*seq_len:(i+1)*seq_len]
"""

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from moeify.errors import MoeifyError
from moeify.json_file import read_json

META = "meta.json"
SPLITS = ("train", "val")


@dataclass
class PackedDataset:
    path: Path

    def __post_init__(self):
        if not (self.path / META).is_file():
            raise MoeifyError(f"{self.path} is not a prepared data directory (no {META}); run `moeify data prepare` first")
        fix = f"{self.path} is damaged: run `moeify data prepare` again"
        self.meta = read_json(self.path / META, fix)
        if not {"seq_len", "dtype", "domains", "tokenizer"} <= set(self.meta):
            raise MoeifyError(f"{self.path / META} lacks {', '.join(sorted({'seq_len', 'dtype', 'domains', 'tokenizer'} - set(self.meta)))}; {fix}")
        self.seq_len: int = self.meta["seq_len"]
        self.domains: list[str] = sorted(self.meta["domains"])
        size = np.dtype(self.meta["dtype"]).itemsize
        for domain, counts in self.meta["domains"].items():  # a token file cut short or emptied
            for split in SPLITS:
                file, expected = self.path / f"{domain}.{split}.bin", counts.get(f"{split}_tokens", 0) * size
                found = file.stat().st_size if file.is_file() else None
                if found != expected:
                    raise MoeifyError(f"{file} holds {'nothing' if found is None else f'{found} bytes'}, {expected} were written; {fix}")

    @cached_property
    def _tokens(self) -> dict[tuple[str, str], np.ndarray]:
        dtype = np.dtype(self.meta["dtype"])
        return {
            (d, split): np.memmap(self.path / f"{d}.{split}.bin", dtype=dtype, mode="r")
            for d in self.domains
            for split in SPLITS
        }

    def num_blocks(self, domain: str, split: str = "train") -> int:
        return len(self._tokens[(domain, split)]) // self.seq_len

    def block(self, domain: str, index: int, split: str = "train") -> torch.Tensor:
        tokens = self._tokens[(domain, split)]
        return torch.from_numpy(tokens[index * self.seq_len : (index + 1) * self.seq_len].astype(np.int64))

    def blocks(self, domain: str, split: str, limit: int | None = None) -> torch.Tensor:
        """The first `limit` blocks (all if None) of one domain and split, as [N, seq_len]."""
        count = self.num_blocks(domain, split) if limit is None else min(limit, self.num_blocks(domain, split))
        return torch.stack([self.block(domain, i, split) for i in range(count)])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]
