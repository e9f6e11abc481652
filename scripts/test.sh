#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest (e.g. -m "not e2e").
# pytest's exit code is ours, so "no tests collected" (5) fails too. The 15 slowest tests are listed, to keep CI
# (limit 30 min on 2 cores) in sight.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -p no:cacheprovider -ra --durations=15 "$@"
