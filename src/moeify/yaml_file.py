"""A user's YAML (or JSON) file read with every problem refused in one line (the text read as json_file.py reads it)."""

from pathlib import Path

import yaml

from moeify.errors import MoeifyError
from moeify.json_file import read_text


def read_yaml(path: Path, what: str, fix: str) -> object:
    """The parsed document; `what` names the file in the messages ("recipe r.yaml"), `fix` says what to give."""
    text = read_text(path, fix, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MoeifyError(f"{what} is not valid YAML: {first}; {fix}") from None
