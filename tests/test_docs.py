"""Transcripts in README.md and docs/*.md (`$ moeify plan-memory ...` and the lines it printed, inside a code
block) are what the command prints today."""

import re
import shlex
from pathlib import Path

import pytest

from moeify.cli import main

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VERBS_RUN_HERE = ("plan-memory",)  # seconds on the CPU, no model files


def code_blocks(text: str) -> list[str]:
    """The text of each fenced block (a line starting with ``` opens one and the next such line closes it)."""
    blocks, current = [], None
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if current is not None:
                blocks.append("".join(current))
            current = None if current is not None else []
        elif current is not None:
            current.append(line)
    return blocks


def transcripts() -> list[tuple[str, str, str]]:
    """(page, command, expected output) for each transcript of a verb run here."""
    found = []
    for page in PAGES:
        for block in code_blocks(page.read_text()):
            for command, output in re.findall(r"^\$ (moeify .*)\n((?:(?!\$ ).*\n)*)", block, flags=re.MULTILINE):
                if shlex.split(command)[1] in VERBS_RUN_HERE:
                    found.append((page.name, command, output))
    return found


def test_the_pages_have_transcripts():
    assert len(transcripts()) >= 3


@pytest.mark.parametrize("page, command, output", transcripts(), ids=lambda value: value[:60] if isinstance(value, str) else value)
def test_a_transcript_prints_what_it_shows(page, command, output, capsys):
    assert main(shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out == output
