"""The one scorer: next-token loss, perplexity and bits per byte of a causal LM.

Used by `eval` (raw documents), training's held-out loss (packed blocks), `quickstart` and
`compare-init` (blocks, with logits kept for |Δlogit|). For documents, each is prefixed with the
document separator (data/text.py) and cut into windows of `seq_len` predictions, so every document
token is predicted exactly once. Bits per byte = total NLL / ln 2 / UTF-8 bytes of the text, which
does not depend on the tokenizer, so models with different tokenizers compare.
"""

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeify.data.text import document_separator
from moeify.errors import MoeifyError


def autocast_for(device: torch.device, dtype: torch.dtype | None = None):
    """Autocast to `dtype` (bf16 or fp16), or none for fp32; `None`: bf16 on GPU, fp32 on CPU."""
    dtype = dtype if dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def next_token_logits(model: torch.nn.Module, ids_BS: torch.Tensor) -> torch.Tensor:
    """Logits of the S-1 predictions a block makes: the model reads ids[:, :-1] (the last token is only a target)."""
    # No KV cache: one forward needs none, and under --compile it would recompile every layer.
    return model(input_ids=ids_BS[:, :-1], use_cache=False).logits


def next_token_nll(model: torch.nn.Module, ids_BS: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (fp32, nats) of each next-token prediction, [B, S-1]."""
    return F.cross_entropy(next_token_logits(model, ids_BS).float().transpose(1, 2), ids_BS[:, 1:], reduction="none")


@dataclass
class Score:
    nll_nats: float  # summed over predicted tokens
    tokens: int
    bytes: int | None = None  # UTF-8 bytes the predictions cover (documents only)
    logits: torch.Tensor | None = None  # [blocks, block_size - 1, vocab] when kept

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
        return {"nll_nats": self.nll_nats, "tokens": self.tokens, "bytes": self.bytes, "loss": self.loss,
                "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


@torch.no_grad()
def score_blocks(model: torch.nn.Module, blocks_NS: torch.Tensor, batch_size: int = 4, keep_logits: bool = False,
                 on_batch: Callable[[], None] | None = None, dtype: torch.dtype | None = None) -> Score:
    """Every block scored independently (its first token is context only); the model's train/eval
    mode is kept as it was. `on_batch()` runs after each forward (e.g. to collect routing statistics)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count, logits = 0.0, 0, []
    try:
        for start in range(0, blocks_NS.shape[0], batch_size):
            ids_BS = blocks_NS[start : start + batch_size].long().to(device)
            with autocast_for(device, dtype):
                logits_BSV = next_token_logits(model, ids_BS).float()
                nll_BS = F.cross_entropy(logits_BSV.transpose(1, 2), ids_BS[:, 1:], reduction="none")
            if keep_logits:
                logits.append(logits_BSV.cpu())
            nll += nll_BS.sum().item()
            count += nll_BS.numel()
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    return Score(nll, count, logits=torch.cat(logits) if keep_logits else None)


def blocks_of(token_ids: list[int], block_size: int, max_tokens: int) -> torch.Tensor:
    """The first max_tokens tokens cut into full blocks [N, block_size]."""
    usable = min(len(token_ids), max_tokens) // block_size * block_size
    if max_tokens < block_size:
        raise MoeifyError(f"--eval-tokens {max_tokens} is less than one block of --block-size {block_size}; raise one or lower the other")
    if usable == 0:
        raise MoeifyError(f"the held-out text has {len(token_ids)} tokens, less than one block of --block-size {block_size}; lower it")
    return torch.tensor(token_ids[:usable]).view(-1, block_size)


def document_windows(tokenizer, documents: list[str], seq_len: int, max_tokens: int) -> tuple[list[torch.Tensor], int]:
    """Windows of seq_len + 1 tokens (inputs and shifted targets) covering up to max_tokens
    predictions, and the UTF-8 bytes of the text those predictions cover."""
    start_token = document_separator(tokenizer)
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


def score_documents(model, tokenizer, documents: list[str], seq_len: int, max_tokens: int, batch_size: int = 4,
                    on_batch: Callable[[], None] | None = None) -> Score:
    windows, text_bytes = document_windows(tokenizer, documents, seq_len, max_tokens)
    by_length: dict[int, list[torch.Tensor]] = {}
    for window in windows:
        by_length.setdefault(len(window), []).append(window)
    nll, count = 0.0, 0
    for length in sorted(by_length, reverse=True):  # windows of one length batch together
        score = score_blocks(model, torch.stack(by_length[length]), batch_size, on_batch=on_batch)
        nll, count = nll + score.nll_nats, count + score.tokens
    return Score(nll, count, text_bytes)
