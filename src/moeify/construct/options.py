"""Which construction settings a construction reads. A setting the user gave that the chosen method (or
router) ignores is refused: `--drop-ratio 0.3 --method upcycle` would otherwise build a plain upcycle."""

from moeify.construct.config import ConstructionConfig
from moeify.construct.methods import CALIBRATION_OPTIONS, ConstructionMethod
from moeify.construct.registry import METHODS, get_method
from moeify.errors import MoeifyError
from moeify.schema import with_given

TEXT_ROUTER_INITS = ("prompts", "calibration")  # every method may take its router from text
# Router settings read only under another setting: what makes them read.
ROUTER_CONDITIONS = {
    "text_router_rule": "--router-init prompts or calibration",
    "mlp_gate_init": "--gate mlp",
    "router_std": "a router drawn at random (--router-init normal or virtual-group, or --gate mlp with --mlp-gate-init normal)",
    "renormalize": "--routing softmax-topk or sigmoid-topk (topk-softmax always sums to 1)",
}


def requested_router_init(config: ConstructionConfig, method: ConstructionMethod) -> str:
    """--router-init with `auto` resolved (prompts when --expert-prompts is given, else the method's default)."""
    init = config.router.router_init
    if init != "auto":
        return init
    return "prompts" if config.router.expert_prompts is not None else method.default_router_init()


def settings_read(config: ConstructionConfig, method: ConstructionMethod, router_init: str) -> frozenset[str]:
    """The method- and router-specific settings this construction reads."""
    router = config.router
    reads = set(method.options)
    if router_init == "calibration" or config.refit:
        reads |= CALIBRATION_OPTIONS
    if router_init in TEXT_ROUTER_INITS:
        reads.add("text_router_rule")
    if router.gate == "mlp":
        reads.add("mlp_gate_init")
    if router_init in ("normal", "virtual-group") or (router.gate == "mlp" and router.mlp_gate_init == "normal"):
        reads.add("router_std")
    if router.routing != "topk-softmax":
        reads.add("renormalize")
    return frozenset(reads)


def conditional_settings() -> set[str]:
    """Every setting some constructions read and others ignore."""
    return set(ROUTER_CONDITIONS).union(*(method.options for method in METHODS.values()))


def _readers(name: str) -> str:
    if name in ROUTER_CONDITIONS:
        return ROUTER_CONDITIONS[name]
    methods = [method for method, m in METHODS.items() if name in m.options]
    readers = f"--method {', '.join(methods[:-1])} or {methods[-1]}" if len(methods) > 1 else f"--method {methods[0]}"
    return readers + (" (and --router-init calibration or --refit)" if name in CALIBRATION_OPTIONS else "")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def refuse_unread(config: ConstructionConfig, method: ConstructionMethod, router_init: str, given: frozenset[str]) -> None:
    """Refuse the `given` settings that this construction ignores."""
    unread = sorted((given & conditional_settings()) - settings_read(config, method, router_init))
    if unread:
        name = unread[0]
        others = f" (also {', '.join(map(_flag, unread[1:]))})" if unread[1:] else ""
        raise MoeifyError(f"{_flag(name)}{others} is read with {_readers(name)}, not with --method {method.name}"
                          f"{'' if name not in ROUTER_CONDITIONS else ' as set'}: drop it (nothing would change) or use what reads it")


def share_settings(constructions: dict[str, tuple[ConstructionConfig, set[str]]], shared: set[str], where: str
                   ) -> dict[str, ConstructionConfig]:
    """Constructions made from settings the user gave in common (compare-init's flags, an experiment's build:
    section) and settings each one's own (label -> (config, own settings)). Each counts as given its own
    settings and the common ones it reads; a common setting that none of them reads is refused."""
    read_by_any: set[str] = set()
    out = {}
    for label, (config, own) in constructions.items():
        method = get_method(config.method)
        reads = settings_read(config, method, requested_router_init(config, method))
        read_by_any |= reads
        out[label] = with_given(config, set(own) | (shared & reads) | (shared - conditional_settings()))
    unread = sorted((shared & conditional_settings()) - read_by_any)
    if unread:
        raise MoeifyError(f"{_flag(unread[0])} is read by none of {where} ({', '.join(constructions)}): it is read with "
                          f"{_readers(unread[0])}; drop it or add such a method")
    return out
