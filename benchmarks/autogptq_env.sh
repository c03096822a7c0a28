#!/usr/bin/env bash
# Creates a separate virtual environment with AutoGPTQ 0.7.1 (its last release) for tests/fixtures/make_autogptq_fixtures.py.
# AutoGPTQ is a peer whose checkpoints optq reads, not a dependency: it lives outside .venv.
# Recipe (what installs and runs here on a CPU-only machine): torch 2.13.0 first, then the Transformers of
# AutoGPTQ's time (4.39) with the versions around it that still import against numpy 1.x, then AutoGPTQ's wheel
# without dependencies (its compiled CUDA kernels do not load against this torch; it falls back to pure torch).
# Usage: benchmarks/autogptq_env.sh [VENV]   (default /tmp/optq-autogptq-venv)
set -euo pipefail
VENV=${1:-${AUTOGPTQ_VENV:-/tmp/optq-autogptq-venv}}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "transformers==4.39.3" "tokenizers<0.19" "accelerate==0.28.0" "peft==0.10.0" "numpy<2" \
    "datasets==2.18.0" "pyarrow<17" "fsspec<=2024.2.0" safetensors sentencepiece rouge gekko tqdm
"$VENV/bin/pip" install -q --no-deps auto-gptq==0.7.1
"$VENV/bin/python" -c "import auto_gptq; print('auto_gptq', auto_gptq.__version__)"
