"""Router rows from text: one set of prompts (or one calibration domain) per expert.

mergekit-moe's `hidden` gate mode, on the input the router actually sees. For expert e and layer L,
p_e = mean over the tokens of e's positive prompts of the MLP input (the post-attention norm's
output), n_e the same over e's negative prompts.
- `fit` (default): the rows W that best predict, by ridge least squares, each text set's expert from
  its tokens' MLP inputs (targets: the centred one-hot of the expert, negated for negative prompts;
  every set weighs the same), W^T = (G + lambda I)^-1 B, from G = sum over sets of the mean x x^T and
  B = sum of the sets' means times their targets: a discriminant that uses the spread of the tokens,
  not only their means (one D x D matrix per layer in memory). Scaled like `centred`.
- `centred`: with mu the mean of the p_e, c_e = p_e - n_e where e has negatives, else
  p_e - mu; each c_e loses its component along mu and is normalised; the rows are scaled together
  so the logits over the prompt tokens have unit standard deviation. Removing mu makes w_e . x =
  w_e . (x - mu): tokens are compared with the experts' means around their common centre (for two
  experts the boundary is the midpoint), and a difference-only row (one with negatives) competes
  on equal terms with the others.
- `mergekit`: rows p_e - n_e (n_e = 0 without negatives), each of unit length, unscaled. The common
  component of the hidden states dominates such rows: an expert whose row is a difference rarely wins.
mergekit itself takes the residual stream entering the layer, at each prompt's last token by default.
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moeify.checkpoint.dense import DenseCheckpoint
from moeify.construct import calibration as calib
from moeify.construct.config import ConstructionConfig
from moeify.data.text import load_tokenizer
from moeify.errors import MoeifyError
from moeify.yaml_file import read_yaml

FIT_RIDGE = 0.01  # the fit's ridge, relative to the mean diagonal of G
SAMPLE_TOKENS = 512  # tokens per expert and layer kept to scale the rows and report how they route (evenly spread)
POSITIVE_KEYS, NEGATIVE_KEYS = ("positive", "positive_prompts"), ("negative", "negative_prompts")


@dataclass
class ExpertText:
    positive: list[list[int]]  # token ids of each text
    negative: list[list[int]]


def read_expert_prompts(path: Path, num_experts: int) -> list[tuple[list[str], list[str]]]:
    """(positive, negative) prompts per expert from a YAML/JSON file, every problem refused in one line."""
    where = f"--expert-prompts {path}"
    data = read_yaml(path, where, "give a YAML list with one `positive: [...]` entry per expert")
    if isinstance(data, dict) and "experts" in data:  # a mergekit-moe config
        data = data["experts"]
    if not isinstance(data, list) or not data:
        raise MoeifyError(f"{where} holds no expert entries; give a YAML list with one `positive: [...]` entry per expert")
    if len(data) != num_experts:
        raise MoeifyError(f"{where} has {len(data)} expert entries for {num_experts} experts; give one entry per expert")
    prompts = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise MoeifyError(f"{where}: entry {index} is not a mapping; write `- positive: [prompt, ...]`")
        unknown = set(entry) - set(POSITIVE_KEYS) - set(NEGATIVE_KEYS) - {"source_model"}
        if unknown:
            raise MoeifyError(f"{where}: entry {index} has unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                              f"use positive and negative")
        positive = _prompt_list(entry, POSITIVE_KEYS, f"{where}: entry {index}")
        if not positive:
            raise MoeifyError(f"{where}: entry {index} has no positive prompts; give each expert at least one")
        prompts.append((positive, _prompt_list(entry, NEGATIVE_KEYS, f"{where}: entry {index}")))
    return prompts


def _prompt_list(entry: dict, keys: tuple[str, ...], where: str) -> list[str]:
    value = next((entry[key] for key in keys if key in entry), None) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise MoeifyError(f"{where}: {keys[0]} must be a list of non-empty prompts")
    return value


def _texts(dense: DenseCheckpoint, config: ConstructionConfig, mode: str) -> tuple[list[ExpertText], list[str]]:
    """Token ids of each expert's texts, and what each expert was given (for the note)."""
    E = config.num_experts
    if mode == "prompts":
        tokenizer = load_tokenizer(dense.path)

        def encode(texts: list[str]) -> list[list[int]]:
            return [tokenizer(text)["input_ids"] for text in texts]

        prompts = read_expert_prompts(Path(config.router.expert_prompts), E)
        return [ExpertText(encode(pos), encode(neg)) for pos, neg in prompts], [f"{len(pos)} prompts" for pos, _ in prompts]
    data = calib.load_calibration(config.data.calibration, dense.path, config.data.calibration_tokens, config.data.calibration_seq_len)
    if len(data.domain_names) != E:
        raise MoeifyError(f"--router-init calibration takes one calibration domain per expert: {len(data.domain_names)} domains "
                          f"({', '.join(data.domain_names)}) for {E} experts; give {E} DOMAIN=PATH sources")
    texts = [ExpertText([block.tolist() for block in data.blocks_NS[data.domains_N == e]], []) for e in range(E)]
    return texts, data.domain_names


class _MLPInputs:
    """Per layer: the sum and count of the MLP inputs of the tokens run, and at most SAMPLE_TOKENS of
    them, every `stride`-th over all the texts; with `gram` ([L] of [D, D] fp64, shared by every text
    set), x x^T of each token added with `weight`."""

    def __init__(self, num_layers: int, gram: list[torch.Tensor] | None, weight: float, total_tokens: int):
        self.sums: list[torch.Tensor | float] = [0.0] * num_layers
        self.count = 0  # tokens of the texts run so far
        self.samples: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.stride = max(1, math.ceil(total_tokens / SAMPLE_TOKENS))
        self.gram, self.weight = gram, weight

    def hook(self, layer: int):
        def record(module, inputs):
            x_TD = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            self.sums[layer] = self.sums[layer] + x_TD.sum(0)
            if self.gram is not None:
                self.gram[layer].addmm_(x_TD.T, x_TD, alpha=self.weight)
            first = -self.count % self.stride  # this text's first token at a multiple of the stride
            self.samples[layer].append(x_TD[first::self.stride].float())
        return record

    def mean(self, layer: int) -> torch.Tensor:
        return self.sums[layer] / self.count


@torch.no_grad()
def _run(model: torch.nn.Module, texts: list[list[int]], progress: tqdm, gram: list[torch.Tensor] | None = None) -> _MLPInputs:
    """Every text through the model; each set weighs 1 in `gram` (each token 1 / the set's tokens)."""
    layers = model.model.layers
    total = sum(len(ids) for ids in texts)
    record = _MLPInputs(len(layers), gram, 1 / max(1, total), total)
    handles = [layer.mlp.register_forward_pre_hook(record.hook(i)) for i, layer in enumerate(layers)]
    try:
        for ids in texts:
            model.model(torch.tensor([ids]), use_cache=False)  # the MLP inputs are all it needs: no logits
            record.count += len(ids)
            progress.update(1)
    finally:
        for handle in handles:
            handle.remove()
    return record


def text_router_rows(dense: DenseCheckpoint, config: ConstructionConfig, mode: str, progress: bool = True) -> list[torch.Tensor]:
    """Router weight [E, D] (fp32) per layer from each expert's prompts (`prompts`) or calibration domain (`calibration`)."""
    rule = config.router.text_router_rule
    texts, given = _texts(dense, config, mode)
    model = calib.load_dense_model(dense.path)
    count = sum(len(t.positive) + len(t.negative) for t in texts)
    gram = [torch.zeros(dense.hidden_size, dense.hidden_size, dtype=torch.float64) for _ in range(dense.num_layers)] if rule == "fit" else None
    with tqdm(total=count, desc=f"router from {mode}", unit="text", disable=not progress, file=sys.stderr) as bar:
        positive = [_run(model, t.positive, bar, gram) for t in texts]
        negative = [_run(model, t.negative, bar, gram) if t.negative else None for t in texts]
    rows, routed = [], []
    for layer in range(dense.num_layers):
        means = [p.mean(layer) for p in positive], [n.mean(layer) if n is not None else None for n in negative]
        rows_ED = _fitted_rows(*means, gram[layer]) if gram is not None else _rows(*means, rule)
        samples = [torch.cat(p.samples[layer]) for p in positive]
        logits = [x_TD @ rows_ED.T for x_TD in samples]
        if rule != "mergekit":
            scale = 1 / torch.cat(logits).std().clamp(min=1e-12)
            rows_ED, logits = rows_ED * scale, [scores * scale for scores in logits]
        rows.append(rows_ED)
        routed.append([(scores.argmax(1) == e).float().mean().item() for e, scores in enumerate(logits)])
    _note(routed, given, mode)
    return rows


def _rows(positive_E: list[torch.Tensor], negative_E: list[torch.Tensor | None], rule: str) -> torch.Tensor:
    """[E, D] unit rows (fp32) from the experts' mean MLP inputs (fp64), by the rule in the module docstring."""
    if rule == "mergekit":
        return F.normalize(torch.stack([p - (n if n is not None else 0) for p, n in zip(positive_E, negative_E)]), dim=1).float()
    mu_D = torch.stack(positive_E).mean(0)
    centred_ED = torch.stack([p - (n if n is not None else mu_D) for p, n in zip(positive_E, negative_E)])
    if len(positive_E) > 1:
        unit_D = F.normalize(mu_D, dim=0)
        centred_ED = centred_ED - (centred_ED @ unit_D)[:, None] * unit_D
    return F.normalize(centred_ED, dim=1).float()


def _fitted_rows(positive_E: list[torch.Tensor], negative_E: list[torch.Tensor | None], gram_DD: torch.Tensor) -> torch.Tensor:
    """Ridge least squares W = argmin sum over text sets s of mean over its tokens ||W x - t_s||^2 + lambda ||W||^2,
    t_s the centred one-hot of its expert (negated for negative prompts), every set weighing 1:
    W^T = (G + lambda I)^-1 B with G = sum_s mean_s x x^T (`gram_DD`) and B = sum_s mean_s(x) t_s^T."""
    E = len(positive_E)
    targets_EE = torch.eye(E, dtype=torch.float64) - 1 / E
    b_DE = torch.stack(positive_E, dim=1) @ targets_EE
    for e, negative in enumerate(negative_E):
        if negative is not None:
            b_DE -= negative[:, None] * targets_EE[e][None]
    ridge = FIT_RIDGE * gram_DD.diagonal().mean()
    return torch.linalg.solve(gram_DD + ridge * torch.eye(len(gram_DD), dtype=torch.float64), b_DE).T.float()


def _note(routed: list[list[float]], given: list[str], mode: str) -> None:
    """How often each expert's own tokens choose it first, on the sampled tokens (a check that the texts differ)."""
    per_expert = torch.tensor(routed)  # [L, E]
    worst = per_expert.min().item()
    layer, expert = divmod(int(per_expert.argmin()), per_expert.shape[1])
    what = ", ".join(f"{e}: {g}" for e, g in enumerate(given)) if mode == "calibration" else f"{len(given)} prompt sets"
    print(f"moeify: note: router rows from {what}; each expert's own tokens choose it first {per_expert.mean().item():.0%} of the "
          f"time (worst: expert {expert} at layer {layer}, {worst:.0%}; texts too alike share experts)", file=sys.stderr)
