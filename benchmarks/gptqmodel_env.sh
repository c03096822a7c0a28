#!/usr/bin/env bash
# Creates a separate virtual environment with GPTQModel 7.7 for side-by-side comparisons.
# GPTQModel is a peer we measure against, not a dependency of optq: it lives outside .venv.
# Recipe (the only one that installs here): torch 2.13.0 first, GPTQModel's requirements except torch
# (and torchao, installed without its deps), then gptqmodel itself without dependencies.
# Usage: benchmarks/gptqmodel_env.sh [VENV]   (default /tmp/optq-gptqmodel-venv)
set -euo pipefail
VENV=${1:-${GPTQMODEL_VENV:-/tmp/optq-gptqmodel-venv}}
WORK=$(mktemp -d)
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" download -q --no-deps gptqmodel==7.7.0 -d "$WORK"
tar xzf "$WORK"/gptqmodel-7.7.0.tar.gz -C "$WORK"
grep -v -E '^(torch|torchao)([<>=; ]|$)' "$WORK/gptqmodel-7.7.0/requirements.txt" > "$WORK/req.txt"
"$VENV/bin/pip" install -q -r "$WORK/req.txt"
"$VENV/bin/pip" install -q --no-deps torchao
"$VENV/bin/pip" install -q --no-deps gptqmodel==7.7.0
"$VENV/bin/python" -c "import gptqmodel; print('gptqmodel', gptqmodel.__version__)"
rm -rf "$WORK"
