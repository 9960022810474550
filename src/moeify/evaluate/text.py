"""Evaluation text: given sources, or the embedded corpus's held-out documents."""

from moeify.data.embedded import embedded_corpus
from moeify.data.sources import Source, read_documents
from moeify.data.text import split_heldout
from moeify.errors import MoeifyError


def evaluation_documents(sources: list[str], max_chars_per_domain: int = 2_000_000) -> dict[str, list[str]]:
    """Documents per domain: every document of each DOMAIN=PATH source, or by default the held-out
    tenth of the embedded corpus (the documents `moeify data prepare` keeps out of training)."""
    if not sources:
        corpus = embedded_corpus(max_chars_per_domain)
        return {domain: split_heldout(docs)[1] for domain, docs in corpus.items()}
    documents: dict[str, list[str]] = {}
    for spec in sources:
        source = Source.parse(spec)
        documents.setdefault(source.domain, []).extend(read_documents(source))
    empty = [domain for domain, docs in documents.items() if not docs]
    if empty:
        raise MoeifyError(f"no text found for domain(s) {', '.join(empty)}; check the source paths (empty files are skipped)")
    return documents
