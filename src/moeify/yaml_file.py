"""A user's YAML (or JSON) file read with every problem refused in one line (the text read as json_file.py reads it)."""

from pathlib import Path

import yaml

from moeify.errors import MoeifyError
from moeify.json_file import read_text


def read_yaml(path: Path, what: str, fix: str) -> object:
    """The parsed document; `what` names the file in the messages ("recipe r.yaml"), `fix` says what to give."""
    text = read_text(path, fix, what)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MoeifyError(f"{what} is not valid YAML: {first}; {fix}") from None
    return _joined_surrogates(document, what)


def _joined_surrogates(value: object, what: str) -> object:
    """PyYAML reads JSON's escaped surrogate pairs ("\\ud83d\\ude00") as two lone halves; join them into the
    character, in every string of the document. A half without its other half is no character."""
    if isinstance(value, list):
        return [_joined_surrogates(item, what) for item in value]
    if isinstance(value, dict):
        return {_joined_surrogates(key, what): _joined_surrogates(item, what) for key, item in value.items()}
    if not isinstance(value, str):
        return value
    try:
        return value.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        lone = next(char for char in value if 0xD800 <= ord(char) <= 0xDFFF)
        raise MoeifyError(f"{what}: {value[:40]!r} holds {lone!r}, half of a UTF-16 surrogate pair without its other half, "
                          "which is no character; write the character itself or its whole pair") from None
