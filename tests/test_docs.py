"""The README and the manual (docs/*.md) say what is true today.

Every fenced block is labelled: `bash` blocks are examples, `python` blocks too, `yaml` blocks are files a user
writes, `text` blocks are output, `console` blocks are transcripts (`$ moeify ...` and what it printed). A page's
unmarked `bash` blocks run as one script, in order, in a fresh directory (then its `python` blocks, in one
namespace); `bash gpu` and `bash nodes` blocks need GPUs or several nodes and `bash ci` blocks are the README's two
commands (CI runs them: `.ci/run`, and tests/test_smollm2.py runs the quickstart), so those are only parsed: every
moeify command in every `bash` block is checked by moeify's own parser. Transcripts of plan-memory are rerun here and
compared; every relative link resolves.
"""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from moeify.cli import main, parse_command

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
KINDS = {"bash", "python", "yaml", "text", "console"}
NOT_RUN = {"gpu": "needs GPUs", "nodes": "needs several nodes", "ci": "one of the README's two commands, which CI runs"}
VERBS_RUN_HERE = ("plan-memory",)  # transcripts of verbs that take seconds on the CPU, no model files
SHELL_OPERATORS = {"&&", "||", ";", "|"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    kind: str
    marker: str
    text: str


def blocks(page: Path) -> list[Block]:
    """Fenced blocks (a line whose stripped text starts with ``` opens one, the next such line closes it)."""
    found, opened, body = [], None, []
    for number, line in enumerate(page.read_text().splitlines(keepends=True), start=1):
        if line.strip().startswith("```"):
            if opened is None:
                words = line.strip()[3:].split()
                opened, body = (number, words[0] if words else "", words[1] if len(words) > 1 else ""), []
            else:
                indent = len(line) - len(line.lstrip())
                found.append(Block(page, opened[0], opened[1], opened[2], "".join(text[indent:] for text in body)))
                opened = None
        elif opened is not None:
            body.append(line)
    assert opened is None, f"{page.name}:{opened[0]}: a block is never closed"
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def block_id(block: Block) -> str:
    return f"{block.page.name}:{block.line}"


def test_every_block_is_labelled():
    for block in ALL_BLOCKS:
        assert block.kind in KINDS, f"{block_id(block)}: label the block as one of {sorted(KINDS)}"
        assert block.marker == "" or (block.kind == "bash" and block.marker in NOT_RUN), f"{block_id(block)}: marker {block.marker!r}"


def moeify_commands(block: Block, variables: dict[str, str]) -> list[tuple[list[str], bool]]:
    """(moeify's argv, whether the example expects it to fail) for each command of a shell block; `NAME="..."`
    lines define variables for the blocks that follow on the page."""
    commands = []
    for line in block.text.replace("\\\n", " ").splitlines():
        assignment = re.fullmatch(r'(\w+)="([^"]*)"', line.strip())
        if assignment:
            variables[assignment[1]] = assignment[2]
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, ";"]:
            if word not in SHELL_OPERATORS:
                command.append(word)
                continue
            argv = moeify_argv(command)
            if argv is not None:
                commands.append((argv, word == "||"))
            command = []
    return commands


def moeify_argv(words: list[str]) -> list[str] | None:
    for index, word in enumerate(words):
        if word == "moeify" or word.endswith("/moeify"):
            return words[index + 1:] if index == 0 or words[index - 1] == "-m" or word.endswith("/moeify") else None
    return None


def shell_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        variables: dict[str, str] = {}
        for block in blocks(page):
            if block.kind == "bash":
                found += [(block_id(block), argv) for argv, fails in moeify_commands(block, variables) if not fails]
    return found


def test_the_pages_have_examples_of_every_verb():
    verbs = {argv[0] if argv[0] != "data" else "data prepare" for _, argv in shell_commands()}
    from moeify.cli import VERBS

    assert verbs >= {verb.name for verb in VERBS}


@pytest.mark.parametrize("where, argv", shell_commands(), ids=lambda value: value if isinstance(value, str) else "")
def test_a_command_parses(where, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes/ as the examples name them
    parse_command(argv)


def test_yaml_blocks_parse():
    yamls = [block for block in ALL_BLOCKS if block.kind == "yaml"]
    assert yamls
    for block in yamls:
        assert yaml.safe_load(block.text), block_id(block)


def transcripts() -> list[tuple[str, str, str]]:
    """(page, command, expected output) for each transcript of a verb run here."""
    found = []
    for block in ALL_BLOCKS:
        if block.kind == "console":
            for command, output in re.findall(r"^\$ (moeify .*)\n((?:(?!\$ ).*\n)*)", block.text, flags=re.MULTILINE):
                if shlex.split(command)[1] in VERBS_RUN_HERE:
                    found.append((block.page.name, command, output))
    return found


def test_the_pages_have_transcripts():
    assert len(transcripts()) >= 3


@pytest.mark.parametrize("page, command, output", transcripts(), ids=lambda value: value[:60] if isinstance(value, str) else value)
def test_a_transcript_prints_what_it_shows(page, command, output, capsys):
    assert main(shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out == output


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {heading_anchor(heading) for heading in re.findall(r"^#+ (.*)$", text, flags=re.MULTILINE)}


def test_every_relative_link_resolves():
    pages = [*PAGES, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs" / "results").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.exists(), f"{page.relative_to(ROOT)}: link {target} leads nowhere"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved), f"{page.relative_to(ROOT)}: no heading #{anchor} in {resolved.name}"
            checked += 1
    assert checked >= 30


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200
    first = "\n".join(lines[:60])
    assert "./setup.sh && .venv/bin/moeify quickstart" in first and "./setup.sh && .venv/bin/python -m pytest" in first
    assert "Mixture-of-Experts" in first and "docs/" in first  # what it is, and where to look next


def runnable(page: Path) -> tuple[str, list[str]]:
    page_blocks = blocks(page)
    script = "".join(block.text for block in page_blocks if block.kind == "bash" and not block.marker)
    return script, [block.text for block in page_blocks if block.kind == "python"]


@pytest.mark.slow
@pytest.mark.parametrize("page", [page for page in PAGES if any(runnable(page))], ids=lambda page: page.name)
def test_a_pages_examples_run(page, tmp_path):
    for shared in ("recipes", "benchmarks"):
        (tmp_path / shared).symlink_to(ROOT / shared)
    script, python_blocks = runnable(page)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if script:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=1800)
        assert done.returncode == 0, f"{page.name}'s examples failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for text in python_blocks:
            exec(compile(text, str(page), "exec"), namespace)
    finally:
        os.chdir(cwd)
