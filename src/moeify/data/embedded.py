"""Text present on any machine with Python, used as the embedded default corpus.

Three domains, built deterministically from the running interpreter's standard library (so the
corpus differs between Python versions; prepared data is cached by content fingerprint):
- `code`: the standard library's Python source files (tests, IDLE and demos excluded);
- `docstrings`: the docstrings of those files, one document per module (English technical prose);
- `reference`: Python's help topics (`pydoc_data`), reference-manual prose.
"""

import ast
import sysconfig
import warnings
from pathlib import Path
from pydoc_data.topics import topics

from moeify.data.text import split_heldout

_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}


def pydoc_topics(heldout: bool) -> list[str]:
    """Python's help-topic texts in name order (the `reference` domain): its held-out documents, or the others."""
    training, held = split_heldout([topics[name] for name in sorted(topics)])
    return held if heldout else training


def _stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIPPED_DIRS & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(source: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return "\n\n".join(doc for node in nodes if (doc := ast.get_docstring(node)))


def embedded_corpus(max_chars_per_domain: int = 2_000_000) -> dict[str, list[str]]:
    """Documents per domain, each domain capped at about max_chars_per_domain characters."""
    all_topics = [topics[name] for name in sorted(topics)]
    corpus: dict[str, list[str]] = {"code": [], "docstrings": [], "reference": _capped(all_topics, max_chars_per_domain)}
    sizes = {"code": 0, "docstrings": 0}
    for path in _stdlib_sources():
        if min(sizes.values()) >= max_chars_per_domain:
            break
        try:
            source = path.read_text(encoding="utf-8")
            docs = _docstrings(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for domain, text in (("code", source), ("docstrings", docs)):
            if text and sizes[domain] < max_chars_per_domain:
                corpus[domain].append(text)
                sizes[domain] += len(text)
    return corpus


def _capped(documents: list[str], max_chars: int) -> list[str]:
    kept, total = [], 0
    for doc in documents:
        if total >= max_chars:
            break
        kept.append(doc)
        total += len(doc)
    return kept
