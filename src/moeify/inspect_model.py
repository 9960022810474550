"""`moeify inspect`: what a dense model is, and what each construction method would make of it."""

import json
from dataclasses import asdict, dataclass
from typing import ClassVar

from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.formats import MoEFeatures, choose_format
from moeify.checkpoint.resolve import resolve_model
from moeify.construct import METHODS, ConstructionConfig
from moeify.construct.config import RouterOptions, check_routing
from moeify.errors import MoeifyError
from moeify.schema import at_least


@dataclass
class InspectConfig:
    RANGES: ClassVar[dict] = {"num_experts": at_least(1), "top_k": at_least(1)}
    model: str
    """Dense model: a Hugging Face directory, a .gguf file or an embedded name (smollm2-135m)."""
    num_experts: int = 8
    """Routed experts E."""
    top_k: int = 2
    """Experts per token k."""
    json: bool = False
    """Print JSON instead of a table."""


def run_inspect(config: InspectConfig) -> str:
    report = inspect_model(config.model, config.num_experts, config.top_k)
    return json.dumps(asdict(report), indent=2) if config.json else format_inspection(report)


@dataclass
class MethodPlan:
    method: str
    expert_size: int
    total_params: int
    active_params: int
    problem: str | None  # why the method cannot be used with these settings


@dataclass
class Inspection:
    path: str
    family: str
    output_architecture: str
    num_layers: int
    hidden_size: int
    ffn_size: int
    params: int
    num_experts: int
    top_k: int
    plans: list[MethodPlan]


def inspect_model(model: str, num_experts: int = 8, top_k: int = 2) -> Inspection:
    check_routing(num_experts, top_k)
    dense = DenseCheckpoint(resolve_model(model))
    L, D, F = dense.num_layers, dense.hidden_size, dense.ffn_size
    params = dense.parameter_count()
    try:
        output_architecture = choose_format(dense.config, MoEFeatures())[0].architecture
    except MoeifyError as error:
        output_architecture = f"none ({error})"
    plans = []
    for method in METHODS.values():
        options = ConstructionConfig(method=method.name, num_experts=num_experts, router=RouterOptions(top_k=top_k))
        try:
            method.check(F, options)
            problem = "needs --calibration" if method.needs_calibration else None
        except MoeifyError as error:
            problem = str(error)
        size = method.expert_size(F, options)
        shared = method.shared_size(F, options)
        without_ffn = params - L * 3 * D * F + L * num_experts * D + L * 3 * D * shared  # + routers and shared expert
        plans.append(
            MethodPlan(
                method.name,
                size,
                without_ffn + L * num_experts * 3 * D * size,
                without_ffn + L * top_k * 3 * D * size,
                problem,
            )
        )
    return Inspection(str(dense.path), dense.family, output_architecture, L, D, F, params, num_experts, top_k, plans)


def format_inspection(report: Inspection) -> str:
    lines = [
        f"model            {report.path}",
        f"family           {report.family} -> {report.output_architecture}",
        f"layers           {report.num_layers}",
        f"hidden size D    {report.hidden_size}",
        f"FFN size F       {report.ffn_size}",
        f"parameters       {_millions(report.params)}",
        "",
        f"F / E            {_division(report.ffn_size, report.num_experts)}",
        "",
        f"with --num-experts {report.num_experts} --top-k {report.top_k} (embeddings counted in total and active):",
        f"  {'method':<18}{'expert size':>12}{'total':>12}{'active':>12}  usable?",
    ]
    for plan in report.plans:
        usable = "yes" if plan.problem is None else plan.problem if plan.problem.startswith("needs") else f"no: {plan.problem}"
        lines.append(
            f"  {plan.method:<18}{plan.expert_size:>12}{_millions(plan.total_params):>12}{_millions(plan.active_params):>12}  {usable}"
        )
    return "\n".join(lines)


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count < 1e9 else f"{count / 1e9:.2f}B"


def _division(ffn_size: int, num_experts: int) -> str:
    if ffn_size % num_experts == 0:
        return f"{ffn_size // num_experts} (divides)"
    return f"{ffn_size / num_experts:.2f} (does not divide: splitting methods need another --num-experts)"
