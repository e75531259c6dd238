#!/usr/bin/env bash
# (Re)creates the bench-only venv holding the peer tools that bench/oneshot.py compares against (llm-compressor
# 0.14). It lives OUTSIDE the repository and is never a project dependency. Idempotent: a venv that already imports
# the pinned versions is left as it is.
#
#   bash bench/setup_peers.sh                 # -> /work/bench-venv
#   BENCH_VENV=/somewhere/else bash bench/setup_peers.sh
#
# torch must stay the CPU 2.13.0 build: PyPI's Linux torch wheel is a CUDA build of several GB, so torch is
# installed first from a local CPU wheel (TORCH_WHEEL, or the one in pip's find-links folder /opt/wheels), and
# every later install runs under constraints-peers.txt, which pins torch==2.13.0.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${BENCH_VENV:-/work/bench-venv}"
PY="${PYTHON:-python3}"
CONSTRAINTS="$HERE/constraints-peers.txt"
REQUIREMENTS="$HERE/requirements-peers.txt"

check() {
    "$VENV/bin/python" - <<'EOF'
import torch, transformers, llmcompressor, compressed_tensors
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
assert torch.__version__.split("+")[0] == "2.13.0" and torch.version.cuda is None, torch.__version__
assert llmcompressor.__version__.startswith("0.14."), llmcompressor.__version__
print(f"peer venv ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}")
EOF
}

if [ -x "$VENV/bin/python" ] && check 2>/dev/null; then
    exit 0
fi

wheel="${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)}"
if [ -z "$wheel" ] || [ ! -f "$wheel" ]; then
    echo "setup_peers.sh: no CPU wheel of torch 2.13.0 found (looked in /opt/wheels); set TORCH_WHEEL=/path/to/torch-2.13.0+cpu-*.whl" >&2
    exit 2
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" "$wheel"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" -r "$REQUIREMENTS"
"$VENV/bin/pip" check
check
