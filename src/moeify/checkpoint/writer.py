"""Write a model tensor by tensor into safetensors shards, holding at most one shard in memory; and the
one writer of whole model directories."""

import json
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from transformers import PretrainedConfig

from moeify.checkpoint.atomic import atomic_directory
from moeify.checkpoint.manifest import Manifest
from moeify.errors import MoeifyError

DEFAULT_SHARD_BYTES = 1 << 30
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format (u64 header length, JSON header, raw little-endian bytes), written
    straight from each tensor's memory: no intermediate copy, and one tensor may appear under
    several names (upcycled experts are the same dense FFN written E times)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for tensor in tensors.values():
            if tensor.numel():
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))


class ShardedWriter:
    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shard_keys: list[list[str]] = []
        self.total_bytes = 0
        self.shapes: dict[str, tuple[int, ...]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert name not in self._pending, f"tensor {name} written twice"
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.shapes[name] = tuple(tensor.shape)
        self.total_bytes += size

    def _flush(self) -> None:
        write_safetensors(self._shard_path(len(self._shard_keys)), self._pending, {"format": "pt"})
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
            weight_map.update({key: path.name for key in self._shard_keys[index]})
        if count > 1:
            index_doc = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
        return final


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cast_floating(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None,
                  keep: Callable[[str], bool] = lambda name: False) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors with floating ones in `dtype` (None: unchanged), except those `keep(name)` holds as they are."""
    for name, tensor in tensors:
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype and not keep(name):
            tensor = tensor.to(dtype)
        yield name, tensor


# Files of a model directory that describe the tokenizer or generation and travel unchanged.
CARRIED_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|chat_template\.(jinja|json)|generation_config\.json|.*\.model|vocab\.json|merges\.txt)$")


def write_checkpoint(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], config: PretrainedConfig, carried_from: Path,
                     manifest: Manifest | None, force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     check: Callable[[Path], None] | None = None, reads: Iterable[Path] = (), verb: str = "") -> Path:
    """The one way a model directory is written (build, export, the end of training): safetensors
    shards (+ index), config.json, the tokenizer and generation files of `carried_from`, moeify.json
    (MoE models). The tensors must be exactly those `config` implies, in their shapes.
    Written into a temporary sibling and renamed only when complete; `check(tmp)` may refuse it first."""
    with atomic_directory(out, force, reads, verb) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.close()
        check_tensor_set(writer.shapes, config, manifest)
        config.save_pretrained(tmp)
        for file in sorted(Path(carried_from).iterdir()):
            if file.is_file() and CARRIED_FILES.match(file.name):
                shutil.copyfile(file, tmp / file.name)
        if manifest is not None:
            manifest.write(tmp)
        if check is not None:
            check(tmp)
    return out


def check_tensor_set(written: dict[str, tuple[int, ...]], config: PretrainedConfig, manifest: Manifest | None) -> None:
    """Refuse a checkpoint whose tensors are not the ones its config implies (a missing expert would be
    filled with random values by a stock load, silently)."""
    from moeify.modeling.hf import expected_disk_shapes

    shared = manifest is not None and manifest.shared_size > 0
    expected = expected_disk_shapes(config, manifest.gate if manifest else "linear", manifest.layout if manifest else None, shared)
    missing = sorted(set(expected) - set(written))
    extra = sorted(set(written) - set(expected))
    wrong = sorted(n for n in set(expected) & set(written) if expected[n] != written[n])
    problems = [f"{len(missing)} missing ({missing[0]}, ...)" if missing else "",
                f"{len(extra)} not in the config ({extra[0]}, ...)" if extra else "",
                f"{len(wrong)} of another shape ({wrong[0]}: {list(written[wrong[0]])}, the config: {list(expected[wrong[0]])})" if wrong else ""]
    if any(problems):
        raise MoeifyError(f"the {config.model_type} checkpoint's tensors do not match its config: {'; '.join(p for p in problems if p)}; "
                          "nothing written (this is a bug in moeify: please report it with the command)")
