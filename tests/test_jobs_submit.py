"""`ray job submit --working-dir .` of jobs/code_unlearn.py to a real head node runs the whole pipeline there.

The submission is the README's command verbatim (jobs/runtime_env.yaml: upload excludes + env vars that
collide with the ones rr_ray.cluster.connect forwards, which the job driver must then leave to the job).
"""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.procs import free_port, stop

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


@pytest.fixture
def ray_head_with_dashboard(tmp_path: Path):
    """A head node (2 CPUs, dashboard = job server) on 127.0.0.1, run with --block so that stopping its process
    group stops exactly the processes it started; yields the job server's http address."""
    ports = {name: free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "metrics-export-port",
                                             "runtime-env-agent-port", "ray-client-server-port")}
    # The job's driver and workers inherit this environment: the venv's python first on PATH, no hub access.
    env = {**os.environ, **AUTH, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
           "PATH": f"{RAY_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rr-job-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    log_path = tmp_path / "head.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(RAY_BIN), "start", "--head", "--block", "--num-cpus=2",
                                 "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                                 "--dashboard-host=127.0.0.1", *[f"--{k}={v}" for k, v in ports.items()],
                                 f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        address = f"http://127.0.0.1:{ports['dashboard-port']}"
        try:
            _wait_http(f"{address}/api/version", proc, log_path)
            yield address, Path(temp_dir)
        finally:
            stop(proc, timeout=60, group=True)
            shutil.rmtree(temp_dir, ignore_errors=True)


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


@pytest.mark.e2e
def test_submitted_code_job_runs_the_pipeline_on_the_cluster(ray_head_with_dashboard, tmp_path: Path) -> None:
    address, temp_dir = ray_head_with_dashboard
    run_dir = tmp_path / "run"
    job_id = f"rr-code-{os.getpid()}"
    t0 = time.perf_counter()
    sub = _client([str(RAY_BIN), "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", ".",
                "--runtime-env", "jobs/runtime_env.yaml", "--",
                "python", "jobs/code_unlearn.py", "--config", "configs/tiny.yaml", "--set", f"run.dir={run_dir}",
                # One release step keeps CI short; test_e2e runs the tiny config's full eq. 1 loop.
                "--set", "release.iterations=0"],
               timeout=1500)
    wall = time.perf_counter() - t0
    status = _job_status(address, job_id)
    out = sub.stdout + sub.stderr
    print(f"ray job submit: {wall:.1f} s, rc {sub.returncode}, job status {status}")
    assert status == "SUCCEEDED" and sub.returncode == 0, out[-4000:]

    # The driver and its workers ran the uploaded copy of the repo, not the checkout this test runs from.
    m = re.search(r"rr_ray from (\S+),", out)
    assert m, out[-4000:]
    workdir = Path(m.group(1)).parent
    assert workdir.resolve() != ROOT.resolve() and temp_dir in workdir.parents, workdir
    uploaded = sorted(p.name for p in workdir.iterdir())
    print(f"uploaded working dir {workdir}: {uploaded}")
    assert {"rr_ray", "jobs", "configs"} <= set(uploaded)
    assert not {".venv", "runs", ".git"} & set(uploaded), uploaded

    # Every stage left its done-marker; the config is the resolved tiny one.
    assert (run_dir / "run.yaml").is_file(), sorted(str(p) for p in run_dir.rglob("*"))
    cfg = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert cfg["task"]["name"] == "code" and cfg["model"]["name_or_path"] == "smollm2-135m-instruct"
    markers = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "_done").glob("*.json"))}
    print(f"stage markers in {run_dir}: {sorted(markers)}")
    assert {"reveal", "release", "evaluate", "export", "report"} <= set(markers), sorted(markers)
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert summary["run_dir"] == str(run_dir)
    # The job joined the head it was submitted to rather than starting its own Ray.
    assert summary["ray"] not in ("local", "existing")
    assert (run_dir / "export/merged/config.json").is_file() and (run_dir / "report/report.md").is_file()


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
