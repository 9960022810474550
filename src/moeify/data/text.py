"""Documents to tokens, and which documents are held out: each defined once for every stage.

- Held out: every HELDOUT_EVERY-th document of a domain, in order (training never sees them;
  evaluation and the embedded held-out text use them; calibration uses the others).
- Joined: each document's tokens followed by the document separator (EOS, else BOS), so packed
  training blocks, calibration blocks and scored text see documents the same way.
"""

from moeify.errors import MoeifyError

HELDOUT_EVERY = 10


def is_heldout(index: int) -> bool:
    return index % HELDOUT_EVERY == 0


def split_heldout(documents: list[str]) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents)."""
    return ([doc for i, doc in enumerate(documents) if not is_heldout(i)],
            [doc for i, doc in enumerate(documents) if is_heldout(i)])


def document_separator(tokenizer) -> int:
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if token is None:
        raise MoeifyError(f"the tokenizer {tokenizer.name_or_path} has no EOS or BOS token to separate documents")
    return token


def tokenize_joined(tokenizer, documents: list[str], max_tokens: int | None = None) -> list[int]:
    """Token ids of the documents in order, each followed by the separator; stops once past max_tokens."""
    separator = document_separator(tokenizer)
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"] + [separator])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return ids


def load_tokenizer(model_dir):
    """The model's tokenizer, or a one-line error when the directory has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MoeifyError(f"{model_dir} has no usable tokenizer ({first[:160]}); copy the dense model's tokenizer files into it") from None
