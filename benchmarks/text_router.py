"""Routers from text on SmolLM2-135M: does held-out text of each domain go to the expert built for it?

Six 3-expert top-1 upcycles of SmolLM2 (every expert the dense FFN, so the MoE computes the dense
model and only the routing differs), one per router: random N(0, 0.02) (the baseline), rows from
the calibration domains (`--router-init calibration --calibration embedded`: code, docstrings,
reference) and rows from prompts (`--router-init prompts --expert-prompts benchmarks/prompts_embedded.yaml`,
four prompts per domain, written by hand, one negative prompt for docstrings), each by the default
least-squares rule and by `--text-router-rule centred`, and the prompts by mergekit's rule. Each is scored with `moeify eval` on the embedded corpus's
held-out tenth (never used for calibration); for each domain d we report the share of its tokens
whose expert is d: mean over the 30 layers and the worst layer. Chance is 1/3.
Usage: python benchmarks/text_router.py [--eval-tokens 4096] [--out benchmarks/results/text_router.json]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

PROMPTS = Path(__file__).with_name("prompts_embedded.yaml")
DOMAINS = ("code", "docstrings", "reference")  # expert e is built for DOMAINS[e] (calibration domains are sorted by name)
ROUTERS = {
    "random": {"router_init": "normal"},
    "calibration": {"router_init": "calibration", "calibration": "embedded"},
    "calibration, centred": {"router_init": "calibration", "calibration": "embedded", "text_router_rule": "centred"},
    "prompts": {"router_init": "prompts", "expert_prompts": str(PROMPTS)},
    "prompts, centred": {"router_init": "prompts", "expert_prompts": str(PROMPTS), "text_router_rule": "centred"},
    "prompts, mergekit's rule": {"router_init": "prompts", "expert_prompts": str(PROMPTS), "text_router_rule": "mergekit"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/text_router.json"))
    args = parser.parse_args()
    from moeify.build import build, build_config
    from moeify.evaluate.run import EvalConfig, evaluate

    results = {}
    with tempfile.TemporaryDirectory() as root:
        built, seconds = {}, {}
        for name, settings in ROUTERS.items():
            start = time.perf_counter()
            built[name] = build(build_config(model="smollm2-135m", out=Path(root) / name, method="upcycle", num_experts=3, top_k=1,
                                             **settings), progress=False)
            seconds[name] = time.perf_counter() - start
        report = evaluate(EvalConfig(models=[str(built[name]) for name in ROUTERS], out=Path(root) / "eval",
                                     max_tokens=args.eval_tokens), progress=False)
        for name, entry in zip(ROUTERS, report["models"]):
            own = {}
            for domain, routing in entry["routing"].items():
                shares = [layer[DOMAINS.index(domain)] for layer in routing["share"]]
                own[domain] = {"mean": sum(shares) / len(shares), "worst_layer": min(shares)}
            results[name] = {"build_seconds": seconds[name], "own_expert_share": own,
                             "bits_per_byte": entry["all_domains"]["bits_per_byte"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"eval_tokens_per_domain": args.eval_tokens, "results": results}, indent=2) + "\n")
    print(f"{'router':<26}" + "".join(f"{d:>22}" for d in DOMAINS) + f"{'build s':>9}")
    for name, r in results.items():
        cells = "".join(f"{r['own_expert_share'][d]['mean']:>14.0%} (min {r['own_expert_share'][d]['worst_layer']:.0%})" for d in DOMAINS)
        print(f"{name:<26}{cells}{r['build_seconds']:>9.0f}")


if __name__ == "__main__":
    main()
