#!/usr/bin/env bash
# Regenerates every table and plot in docs/results from a fresh checkout (after ./setup.sh).
# 2 CPU cores: about 3 hours in all. Each command is independent.
set -euo pipefail
cd "$(dirname "$0")/../.."
M=.venv/bin/moeify
for name in upcycle-vs-dense capacity scale sampling construction distill refit; do
  $M experiment "$name" --out "docs/results/$name" --force
done
$M compare-init smollm2-135m --experts 8 --top-k 2 --out docs/results/compare-init --force
