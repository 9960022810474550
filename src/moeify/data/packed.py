"""Tokenised corpora packed into fixed-length blocks: one memory-mapped token file per domain and split.

Layout of a prepared directory:
  meta.json                         seq_len, dtype, tokenizer fingerprint, per-domain counts
  DOMAIN.train.bin, DOMAIN.val.bin  flat token ids; block i is tokens[i*seq_len:(i+1)*seq_len]
"""

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from moeify.errors import MoeifyError

META = "meta.json"
SPLITS = ("train", "val")


@dataclass
class PackedDataset:
    path: Path

    def __post_init__(self):
        if not (self.path / META).is_file():
            raise MoeifyError(f"{self.path} is not a prepared data directory (no {META}); run `moeify data prepare` first")
        self.meta = json.loads((self.path / META).read_text())
        self.seq_len: int = self.meta["seq_len"]
        self.domains: list[str] = sorted(self.meta["domains"])

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
