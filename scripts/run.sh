#!/usr/bin/env bash
# Set up (idempotent) and run the default job: `rr-ray run configs/default.yaml`, resumable.
# Extra arguments go to rr-ray run (e.g. --set run.dir=s3://bucket/prefix).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/rr-ray run configs/default.yaml "$@"
