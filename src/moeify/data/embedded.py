"""Text present on any machine with Python: the interpreter's own help topics (pydoc_data)."""

from pydoc_data.topics import topics

HELDOUT_EVERY = 10  # every 10th topic (in name order) is held out from any training


def pydoc_topics(heldout: bool) -> list[str]:
    """Python's help-topic texts in name order: the held-out tenth, or the other nine tenths."""
    names = sorted(topics)
    return [topics[name] for i, name in enumerate(names) if (i % HELDOUT_EVERY == 0) == heldout]


def heldout_text() -> str:
    return "\n\n".join(pydoc_topics(heldout=True))
