"""Corpus readers: plain text files or folders, jsonl, parquet, Hugging Face datasets saved to disk.

A source is given as DOMAIN=PATH; every document read from it belongs to that domain.
"""

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moeify.checkpoint.atomic import safe_name
from moeify.errors import MoeifyError

TEXT_FIELD = "text"


@dataclass(frozen=True)
class Source:
    domain: str
    path: Path

    @classmethod
    def parse(cls, spec: str) -> "Source":
        domain, sep, path = spec.partition("=")
        if not sep or not domain or not path:
            raise MoeifyError(f"source {spec!r} is not DOMAIN=PATH; write e.g. --source code=./src")
        source = cls(safe_name(domain, f"source {spec!r}: the domain"), Path(path).expanduser())
        if not source.path.exists():
            raise MoeifyError(f"source {spec!r}: {source.path} does not exist")
        return source

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith("."))


def source_paths(specs: Iterable[str]) -> list[Path]:
    """The PATH of every DOMAIN=PATH spec (what a command reads; not checked here)."""
    return [Path(spec.partition("=")[2].strip()).expanduser() for spec in specs if "=" in spec]


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def read_documents(source: Source) -> Iterator[str]:
    if is_hf_dataset(source.path):
        yield from _hf_dataset(source.path)
        return
    for file in source.files():
        if file.suffix == ".jsonl":
            yield from _jsonl(file)
        elif file.suffix == ".parquet":
            yield from _parquet(file)
        else:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                if file == source.path:  # named by the user: say so; inside a folder it is a binary file to skip
                    raise MoeifyError(f"{file} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
                                      "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
                continue
            if text.strip():
                yield text


def _jsonl(file: Path) -> Iterator[str]:
    with open(file, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MoeifyError(f"{file}:{number} is not UTF-8 text; save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise MoeifyError(f"{file}:{number} is not valid JSON; each line must be an object with a 'text' field") from None
            if not isinstance(record, dict) or not isinstance(record.get(TEXT_FIELD), str):
                raise MoeifyError(f"{file}:{number} has no string field 'text'; each line must be {{\"text\": ...}}")
            if record[TEXT_FIELD].strip():
                yield record[TEXT_FIELD]


def _parquet(file: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MoeifyError(f"reading {file} needs pyarrow; pip install pyarrow") from None
    try:
        table = pq.read_table(file)
    except Exception as error:  # pyarrow's ArrowInvalid and friends
        raise MoeifyError(f"cannot read {file} as parquet ({str(error).splitlines()[0]}); give a parquet file with a 'text' column") from None
    if TEXT_FIELD not in table.column_names:
        raise MoeifyError(f"{file} has no column 'text' (columns: {', '.join(table.column_names)})")
    texts = table.column(TEXT_FIELD).to_pylist()
    if any(t is not None and not isinstance(t, str) for t in texts):
        raise MoeifyError(f"{file}'s column 'text' holds {table.schema.field(TEXT_FIELD).type}, not strings; give a column of text")
    yield from (t for t in texts if t and t.strip())


def _hf_dataset(path: Path) -> Iterator[str]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise MoeifyError(f"reading the dataset at {path} needs the datasets package; pip install datasets") from None
    dataset = load_from_disk(str(path))
    splits = [dataset[name] for name in sorted(dataset)] if isinstance(dataset, DatasetDict) else [dataset]
    for split in splits:
        if TEXT_FIELD not in split.column_names:
            raise MoeifyError(f"dataset {path} has no column 'text' (columns: {', '.join(split.column_names)})")
        yield from (t for t in split[TEXT_FIELD] if t and t.strip())
