"""Per-domain loss, perplexity and bits per byte of a causal LM on raw documents.

Every document is tokenised with the model's own tokenizer, prefixed with EOS (or BOS), and cut
into windows of `seq_len` predictions; each document token is predicted exactly once. Bits per
byte = total NLL / ln 2 / UTF-8 bytes of the documents, which does not depend on the tokenizer,
so models with different tokenizers compare.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class DomainScore:
    nll_nats: float  # summed over predicted tokens
    tokens: int
    bytes: int

    @property
    def loss(self) -> float:
        return self.nll_nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / self.bytes

    def summary(self) -> dict:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def document_windows(tokenizer, documents: list[str], seq_len: int, max_tokens: int) -> tuple[list[torch.Tensor], int]:
    """Windows of seq_len + 1 tokens (inputs and shifted targets) covering up to max_tokens
    predictions, and the UTF-8 bytes of the text those predictions cover."""
    start_token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    windows, predicted, text_bytes = [], 0, 0
    for doc in documents:
        if predicted >= max_tokens:
            break
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        budget = max_tokens - predicted
        if len(ids) > budget:  # keep whole tokens, count the bytes of exactly the text they cover
            ids = ids[:budget]
            doc = tokenizer.decode(ids)
        tokens = [start_token, *ids]
        for start in range(0, len(tokens) - 1, seq_len):
            windows.append(torch.tensor(tokens[start : start + seq_len + 1]))
        predicted += len(ids)
        text_bytes += len(doc.encode("utf-8"))
    return windows, text_bytes


@torch.no_grad()
def score_documents(model, tokenizer, documents: list[str], seq_len: int, max_tokens: int, batch_size: int = 4,
                    on_batch=None) -> DomainScore:
    """`on_batch()` is called after every forward pass (e.g. to collect routing statistics)."""
    windows, text_bytes = document_windows(tokenizer, documents, seq_len, max_tokens)
    nll, count = 0.0, 0
    by_length: dict[int, list[torch.Tensor]] = {}
    for window in windows:
        by_length.setdefault(len(window), []).append(window)
    device = next(model.parameters()).device
    for length in sorted(by_length, reverse=True):
        group = by_length[length]
        for start in range(0, len(group), batch_size):
            batch = torch.stack(group[start : start + batch_size]).to(device)
            logits = model(input_ids=batch[:, :-1]).logits.float()
            nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
            if on_batch is not None:
                on_batch()
    return DomainScore(nll, count, text_bytes)
