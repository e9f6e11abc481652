#!/usr/bin/env bash
# The prepared GPU check: on a machine with one NVIDIA GPU, builds a CUDA venv (.venv-gpu, the `gpu` extra:
# vLLM proper and DeepSpeed) and proves, with the repo's own tests and benchmark:
#   1. vLLM greedy tokens and log-likelihoods equal HF + peft under a composed edit log (tests/test_vllm_backend.py);
#   2. a DeepSpeed ZeRO-2 PEM trains on the GPU, and on Ray Train's CPU path too (tests/test_train.py -k deepspeed);
#   3. the ray.serve.llm app answers the openai client (tests/test_serving_llm.py);
#   4. generation throughput, vllm vs hf, same prompts and budget (benchmarks/generation_backends.py).
# Figures go to benchmarks/results/gpu_*. Meant to finish in under 8 minutes after the install; time-boxed
# per part. Never edit its results by hand: rerun it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RR_RAY_GPU_VENV:-.venv-gpu}
OUT=benchmarks/results
command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi: this is not a GPU machine" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install -e ".[dev,gpu]"  # vLLM pins its CUDA torch
pip install --no-deps $(grep -v '^#' scripts/assets.txt)
pip install "alt-profanity-check==1.9.1"
"$VENV/bin/python" -c "import torch, vllm; assert torch.cuda.is_available(), 'torch sees no GPU'"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_check_device.csv"
t0=$(date +%s)
timeout 300 "$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider --junitxml="$OUT/gpu_check_tests.xml" \
  tests/test_vllm_backend.py tests/test_train.py tests/test_serving_llm.py \
  -k "greedy or loglik or row_safe or deepspeed or models_lists or chat_unlearned or completion_and_streaming"
timeout 180 "$VENV/bin/python" benchmarks/generation_backends.py --prompts 64 --max-new-tokens 64 \
  --out "$OUT/gpu_generation_backends.json"
echo "gpu_check: done in $(( $(date +%s) - t0 )) s; figures in $OUT/gpu_*" >&2
