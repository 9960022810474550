"""Calibration text and the statistics data-driven construction methods take from the dense model.

Text: DOMAIN=PATH sources, or the training part of the embedded corpus (never its held-out tenth,
which evaluation uses). Each domain is tokenised, joined with EOS and cut into blocks; blocks are
taken round-robin across domains up to the token budget, so every domain is represented.

Statistics (all on h = silu(gate(x)) * up(x), the input of down_proj, per layer):
- co-activation: sum over tokens of |h_i| |h_j|  [F, F];
- gradient importance per group g: sum over the group's tokens of |h_j * dL/dh_j| / tokens  [F].
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moeify.construct.kmeans import balanced_kmeans
from moeify.data.embedded import embedded_corpus
from moeify.data.sources import Source, read_documents
from moeify.data.text import load_tokenizer, split_heldout, tokenize_joined
from moeify.errors import MoeifyError

EMBEDDED = "embedded"


@dataclass
class CalibrationData:
    blocks_NS: torch.Tensor  # token ids
    domains_N: torch.Tensor  # domain index of each block
    domain_names: list[str]
    spec: str

    @property
    def tokens(self) -> int:
        return self.blocks_NS.numel()


def calibration_documents(spec: str) -> dict[str, list[str]]:
    if spec == EMBEDDED:
        corpus = embedded_corpus(400_000)
        return {domain: split_heldout(docs)[0] for domain, docs in corpus.items()}
    documents: dict[str, list[str]] = {}
    for part in spec.split(","):
        source = Source.parse(part.strip())
        documents.setdefault(source.domain, []).extend(read_documents(source))
    return {domain: docs for domain, docs in documents.items() if docs}


def load_calibration(spec: str, model_dir: Path, max_tokens: int, seq_len: int) -> CalibrationData:
    tokenizer = load_tokenizer(model_dir)
    per_domain: list[torch.Tensor] = []
    names = []
    for domain, docs in sorted(calibration_documents(spec).items()):
        ids = tokenize_joined(tokenizer, docs, max_tokens + seq_len)
        count = len(ids) // seq_len
        if count:
            per_domain.append(torch.tensor(ids[: count * seq_len]).view(count, seq_len))
            names.append(domain)
    blocks, domains = [], []
    wanted = max_tokens // seq_len
    for round_ in range(max((len(b) for b in per_domain), default=0)):
        for index, domain_blocks in enumerate(per_domain):
            if round_ < len(domain_blocks) and len(blocks) < wanted:
                blocks.append(domain_blocks[round_])
                domains.append(index)
    if not blocks:
        raise MoeifyError(f"calibration data {spec!r} holds fewer than {seq_len} tokens; give more text or a smaller --calibration-seq-len")
    return CalibrationData(torch.stack(blocks), torch.tensor(domains), names, spec)


def load_dense_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _down_proj_inputs(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.mlp.down_proj for layer in model.model.layers]


class StopForward(Exception):
    """Raised by a hook once it has what it needs from a forward: the layers above it need not run."""


@torch.no_grad()
def coactivation_graphs(model: torch.nn.Module, data: CalibrationData, batch_size: int = 4,
                        layers: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """Per layer (all, or `layers`), sum over tokens of |h_i| |h_j| (fp32, [F, F]); each forward
    stops after the last wanted layer."""
    wanted = sorted(range(len(model.model.layers)) if layers is None else set(layers))
    graphs: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def record(module, inputs):
            h_TF = inputs[0].reshape(-1, inputs[0].shape[-1]).abs().float()
            gram = h_TF.T @ h_TF
            graphs[layer] = gram if layer not in graphs else graphs[layer].add_(gram)
            if layer == wanted[-1]:
                raise StopForward
        return record

    down_projs = _down_proj_inputs(model)
    handles = [down_projs[i].register_forward_pre_hook(hook(i)) for i in wanted]
    try:
        for start in range(0, len(data.blocks_NS), batch_size):
            try:
                model(data.blocks_NS[start:start + batch_size], use_cache=False)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return graphs


def layer_chunks(num_layers: int, bytes_per_layer: int, budget_bytes: int) -> list[range]:
    """Consecutive layers in groups whose graphs fit in `budget_bytes` together (one layer at least)."""
    per_chunk = max(1, budget_bytes // max(1, bytes_per_layer))
    return [range(start, min(num_layers, start + per_chunk)) for start in range(0, num_layers, per_chunk)]


@torch.no_grad()
def _block_embeddings(model: torch.nn.Module, data: CalibrationData, batch_size: int) -> torch.Tensor:
    outputs = []
    for start in range(0, len(data.blocks_NS), batch_size):
        # The base model's output is the causal LM's last hidden state, without computing the logits.
        hidden = model.model(data.blocks_NS[start:start + batch_size], use_cache=False).last_hidden_state
        outputs.append(hidden.mean(dim=1))
    return torch.cat(outputs)


def calibration_groups(model: torch.nn.Module, data: CalibrationData, num_groups: int, seed: int,
                       batch_size: int = 4) -> tuple[torch.Tensor, str]:
    """Group index per block: the domain when there are exactly num_groups domains, else balanced
    k-means (seeded) on each block's mean last hidden state, so every group has the same number of blocks.
    Blocks beyond a multiple of num_groups get group -1 and are not used."""
    if len(data.domain_names) == num_groups:
        return data.domains_N.clone(), "domain"
    usable = len(data.blocks_NS) // num_groups * num_groups
    embeddings = torch.nn.functional.normalize(_block_embeddings(model, data, batch_size)[:usable], dim=1)
    groups = torch.full((len(data.blocks_NS),), -1, dtype=torch.long)
    groups[:usable] = balanced_kmeans(embeddings, num_groups, seed=seed).labels_N
    return groups, "k-means on mean last hidden state"


def gradient_importance(model: torch.nn.Module, data: CalibrationData, groups_N: torch.Tensor, num_groups: int,
                        batch_size: int = 4) -> torch.Tensor:
    """importance [G, L, F]: per group, sum over tokens of |h * dL/dh| divided by the group's tokens."""
    num_layers = len(model.model.layers)
    ffn = model.config.intermediate_size
    importance = torch.zeros(num_groups, num_layers, ffn, dtype=torch.float64)
    current: dict[str, torch.Tensor] = {}

    def hook(layer: int):
        def record(module, inputs):
            h_BSF = inputs[0].detach()  # the hook must not hold the graph's tensor: that cycle keeps every batch's graph alive
            groups_B = current["groups"]

            def accumulate(grad_BSF: torch.Tensor) -> None:
                score_BF = (h_BSF * grad_BSF).abs().sum(dim=1).double()
                importance[:, layer].index_add_(0, groups_B, score_BF)
            inputs[0].register_hook(accumulate)
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(_down_proj_inputs(model))]
    model.requires_grad_(False)
    embed = model.get_input_embeddings()
    try:
        used = (groups_N >= 0).nonzero().squeeze(1)
        for start in range(0, len(used), batch_size):
            index = used[start:start + batch_size]
            current["groups"] = groups_N[index]
            ids = data.blocks_NS[index]
            inputs = embed(ids).requires_grad_(True)  # gradients flow although no weight needs one
            loss = model(inputs_embeds=inputs, labels=ids, use_cache=False).loss
            (loss * ids[:, 1:].numel()).backward()  # summed over tokens: dL/dh per token
    finally:
        for handle in handles:
            handle.remove()
    tokens_G = torch.bincount(groups_N[groups_N >= 0], minlength=num_groups).double() * data.blocks_NS.shape[1]
    return (importance / tokens_G[:, None, None]).float()


def min_blocks(num_groups: int) -> int:
    """Gradient methods need at least two blocks per group."""
    return 2 * num_groups if num_groups > 1 else 2

