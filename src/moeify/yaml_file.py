"""A user's YAML (or JSON) file read with every problem refused in one line."""

from pathlib import Path

import yaml

from moeify.errors import MoeifyError


def read_yaml(path: Path, what: str, fix: str) -> object:
    """The parsed document; `what` names the file in the messages ("recipe r.yaml"), `fix` says what to give."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise MoeifyError(f"{what} does not exist; {fix}") from None
    except UnicodeDecodeError:
        raise MoeifyError(f"{what} is not a text file (not UTF-8); {fix}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MoeifyError(f"{what} is not valid YAML: {first}; {fix}") from None
