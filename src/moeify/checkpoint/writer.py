"""Write a model tensor by tensor into safetensors shards, holding at most one shard in memory."""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 1 << 30


class ShardedWriter:
    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shard_keys: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert name not in self._pending, f"tensor {name} written twice"
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self._pending, str(self._shard_path(len(self._shard_keys))), metadata={"format": "pt"})
        self._shard_keys.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def _shard_path(self, index: int) -> Path:
        return self.directory / f"shard-{index:05d}.partial"

    def close(self) -> list[Path]:
        """Finish the last shard and give the shards their final Hugging Face names (+ index if several)."""
        if self._pending or not self._shard_keys:
            self._flush()
        count = len(self._shard_keys)
        if count == 1:
            final = [self.directory / "model.safetensors"]
        else:
            final = [self.directory / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for index, path in enumerate(final):
            self._shard_path(index).rename(path)
            os.chmod(path, 0o644)  # safetensors creates files owner-only
            weight_map.update({key: path.name for key in self._shard_keys[index]})
        if count > 1:
            index_doc = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
        return final
