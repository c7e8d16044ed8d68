#!/usr/bin/env bash
# One-time set-up on a fresh machine: CPU torch if no torch is installed, then the package.
# GPU users: install the CUDA torch build you want first; this script then leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch" 2>/dev/null; then
  # The CPU wheel: a plain `pip install torch` would pull several GB of CUDA packages.
  python3 -m pip install -q "torch==2.13.0" || python3 -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
python3 -m pip install -q -e ".[dev]"
