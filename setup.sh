#!/usr/bin/env bash
# Create .venv and install moeify with its test extras.
# torch is installed first, pinned, so that pip takes the local CPU build where one lies on disk
# (and a bare requirement never pulls a multi-GB CUDA build). Override with MOEIFY_TORCH, e.g.
#   MOEIFY_TORCH="torch==2.9.1" ./setup.sh
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "${MOEIFY_TORCH:-torch==2.13.0}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"${pip[@]}" -e ".[test]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "moeify installed in $(pwd)/.venv"
