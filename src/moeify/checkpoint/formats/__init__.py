"""Output formats by name, and the rule that picks one.

Adding a format: an OutputFormat subclass in its own file and one line in FORMATS below (or
`register_format(...)` from outside the package).
"""

from transformers import PretrainedConfig

from moeify.checkpoint.formats.base import MoEFeatures, OutputFormat
from moeify.checkpoint.formats.deepseek_v3 import DeepseekV3Style
from moeify.checkpoint.formats.mixtral import Mixtral
from moeify.checkpoint.formats.qwen2_moe import Qwen2Moe
from moeify.checkpoint.formats.qwen3_moe import Qwen3Moe
from moeify.errors import MoeifyError

MOEIFY_FORMAT = "moeify"  # a model with moeify's MLP gate: a stock layout plus gate keys no stock class knows
FORMATS: dict[str, OutputFormat] = {}
# The default rule: sigmoid scores go to the DeepSeek-V3 format; otherwise the dense family's own
# MoE architecture, and when that cannot hold the MoE (a shared expert, no renormalisation), Qwen2-MoE.
FAMILY_FORMAT = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
SIGMOID_FORMAT = "deepseek-v3"
FALLBACK_FORMAT = "qwen2_moe"


def register_format(fmt: OutputFormat) -> OutputFormat:
    assert fmt.name and fmt.name not in FORMATS and fmt.name != MOEIFY_FORMAT, f"format name {fmt.name!r} missing or taken"
    FORMATS[fmt.name] = fmt
    return fmt


for _format in [Mixtral(), Qwen2Moe(), Qwen3Moe(), DeepseekV3Style()]:
    register_format(_format)


def format_of_model_type(model_type: str) -> OutputFormat | None:
    """The format of a loaded MoE config (by its model_type), or None for a dense model."""
    return next((fmt for fmt in FORMATS.values() if fmt.config_class.model_type == model_type), None)


def default_order(dense: PretrainedConfig, features: MoEFeatures) -> list[str]:
    if features.router.routing == "sigmoid-topk":
        return [SIGMOID_FORMAT]
    native = FAMILY_FORMAT.get(dense.model_type)
    return [name for name in dict.fromkeys([native, FALLBACK_FORMAT]) if name is not None]


def choose_format(dense: PretrainedConfig, features: MoEFeatures, name: str | None = None) -> tuple[OutputFormat, str]:
    """The format whose layout the MoE is written in, and the name the manifest records (`moeify`
    when the router is moeify's MLP gate, which no stock format holds)."""
    if name is not None and name != MOEIFY_FORMAT and name not in FORMATS:
        raise MoeifyError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}")
    if name in FORMATS and features.router.gate != "linear":
        raise MoeifyError(f"--format {name} cannot hold the {features.router.gate} gate (no stock format has it): drop --format "
                          f"(the MoE is written in moeify's format, {MOEIFY_FORMAT}) or build with --gate linear")
    if name == MOEIFY_FORMAT and features.router.gate == "linear":
        raise MoeifyError(f"--format {MOEIFY_FORMAT} is the format of an MLP gate (--gate mlp); with a linear gate drop --format "
                          f"or name a stock one: {', '.join(FORMATS)}")
    candidates = [name] if name not in (None, MOEIFY_FORMAT) else default_order(dense, features)
    reasons = []
    for candidate in candidates:
        reason = FORMATS[candidate].supports(dense, features)
        if reason is None:
            return FORMATS[candidate], candidate if features.router.gate == "linear" else MOEIFY_FORMAT
        reasons.append(reason)
    detail = "; ".join(reasons) or f"no format is made from {dense.model_type} models"
    hint = "" if features.router.routing == "sigmoid-topk" else "; --routing sigmoid-topk (the DeepSeek-V3 format) holds shared experts"
    raise MoeifyError(f"cannot represent this {dense.model_type} MoE ({features.describe()}) in a stock format: {detail}{hint}")


__all__ = ["FORMATS", "MOEIFY_FORMAT", "MoEFeatures", "OutputFormat", "choose_format", "format_of_model_type", "register_format"]
