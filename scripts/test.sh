#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest (e.g. -m "not e2e").
# pytest's exit code is ours, so "no tests collected" (5) fails too. The 15 slowest tests are listed, to keep CI
# (kept under 40 min on 2 cores) in sight.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# vLLM's own switch for CPU CI: an engine without LoRA is traced by dynamo and run eagerly instead of compiled
# by inductor (~2 min per engine on 2 cores), and warm-up is skipped. LoRA engines run eager either way.
export VLLM_CPU_CI_ENV=${VLLM_CPU_CI_ENV:-1}
# Ray Train's controller polls its workers every 2 s by default; a tiny-model PEM trains in under a second, so
# the poll is most of a test's fit() (measured: 29 -> 20 s per run at 0.25 s). It changes no code path.
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.25}
# Ray Serve marks a proxy dead after three 5 s readiness checks; on 2 busy cores one took longer to start and
# the whole serving module errored at setup. Only the wait changes.
export RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=${RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S:-30}
# Two pytest workers (pytest-xdist): much of the suite waits on Ray, subprocesses and HTTP rather than on the
# CPU, so two at a time finish sooner on 2 cores (57 -> 40 min on a busy machine). RR_RAY_TEST_WORKERS=0: one
# process. loadfile keeps each module on one worker, so a module-scoped fixture (a Serve app, a finished run) is
# built once, not once per worker; conftest.py starts the slowest modules first.
exec .venv/bin/python -m pytest -p no:cacheprovider -ra --durations=15 -n "${RR_RAY_TEST_WORKERS:-2}" \
  --dist loadfile "$@"
