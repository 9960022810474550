"""JSON and JSON-lines files read with every problem refused in one line naming the file (the YAML reader is
yaml_file.py): a file cut short, not UTF-8, not JSON, or of the wrong shape."""

import json
from pathlib import Path

from moeify.errors import MoeifyError


def read_text(path: Path, fix: str, what: str | None = None) -> str:
    """A user's UTF-8 file; `what` names it in the messages (default: its path), `fix` says what to give."""
    what = what or str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise MoeifyError(f"{what} does not exist; {fix}") from None
    except UnicodeDecodeError:
        raise MoeifyError(f"{what} is not a text file (not UTF-8); {fix}") from None


def read_json(path: Path, fix: str, kind: type = dict) -> object:
    """The parsed document, which must be a `kind` (a JSON object by default); `fix` says what to do."""
    try:
        value = json.loads(read_text(path, fix))
    except json.JSONDecodeError as error:
        raise MoeifyError(f"{path} is cut short or not JSON ({error.msg}, line {error.lineno}); {fix}") from None
    if not isinstance(value, kind):
        raise MoeifyError(f"{path} holds a {type(value).__name__}, not a JSON {'object' if kind is dict else kind.__name__}; {fix}")
    return value


def weight_map(index: Path) -> dict[str, str]:
    """The tensor -> file map of a sharded safetensors checkpoint's model.safetensors.index.json."""
    fix = f"{index.parent} is damaged: convert, copy or build it again"
    found = read_json(index, fix).get("weight_map")
    if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
        raise MoeifyError(f"{index} has no weight_map of tensor names to files; {fix}")
    return found


def read_jsonl(path: Path, fix: str, last_may_be_cut: bool = False) -> list[dict]:
    """One JSON object a line (blank lines skipped). `last_may_be_cut`: a file appended to by a process that may
    have been killed mid-line (metrics.jsonl) loses that last line instead of failing."""
    lines = [line for line in read_text(path, fix).splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if last_may_be_cut and number == len(lines):
                break
            raise MoeifyError(f"{path} line {number} is not JSON ({error.msg}); {fix}") from None
        if not isinstance(record, dict):
            raise MoeifyError(f"{path} line {number} is not a JSON object; {fix}")
        records.append(record)
    return records
