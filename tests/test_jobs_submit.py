"""Helpers for `ray job submit` against a real cluster (tests/test_two_nodes.py submits the code job to a
two-node one), and the job driver's handling of the job's env vars."""

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).with_name("ray")
# Token auth with a token of this test's own (RAY_AUTH_TOKEN outranks ~/.ray/auth_token), shared by the head,
# the job's driver and workers (they inherit the head's environment) and the CLI clients.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError as exc:  # refused while starting; an HTTP error status still means it is up
            if getattr(exc, "code", None):
                return
        time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout} s: {log.read_text()[-3000:]}")


def _client(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **AUTH}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _job_status(address: str, job_id: str) -> str:
    """The job's JobStatus name, e.g. SUCCEEDED (the `ray job status` CLI prints prose, not the name)."""
    code = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    res = _client([sys.executable, "-c", code, address, job_id], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


def test_job_driver_leaves_the_jobs_env_vars_to_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray refuses a driver runtime_env that repeats an env var of the job's; connect() must not repeat them."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from rr_ray import cluster

    job_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env, "metadata": {}}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the job's env_vars are in the driver's environment too
    assert cluster._job_env_vars() == {"HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"}
    assert _merge_runtime_env(job_env, {"env_vars": {"HF_HUB_OFFLINE": "1"}}) is None  # what we avoid
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert cluster._job_env_vars() == set()
