"""`moeify generate`: a quick look at what a model writes (greedy, chat template when there is one)."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from moeify.errors import MoeifyError
from moeify.evaluate.models import load_for_eval
from moeify.schema import at_least


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def greedy(model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> str:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@dataclass
class GenerateConfig:
    RANGES: ClassVar[dict] = {"max_new_tokens": at_least(1)}
    model: str
    """Model directory, training run, .gguf or embedded name."""
    prompt: str
    """The prompt (wrapped in the chat template when the tokenizer has one)."""
    max_new_tokens: int = 40
    chat: bool = True
    """Use the tokenizer's chat template (--no-chat: the raw prompt)."""


def run_generate(config: GenerateConfig) -> str:
    if not config.prompt.strip():
        raise MoeifyError("--prompt is empty; give the text to complete")
    return generate(config.model, config.prompt, config.max_new_tokens, config.chat)


def generate(model: str, prompt: str, max_new_tokens: int = 40, chat: bool = True) -> str:
    _, lm, tokenizer, _ = load_for_eval(model)
    return greedy(lm, tokenizer, prompt_ids(tokenizer, prompt, chat), max_new_tokens)
