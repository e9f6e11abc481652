"""With RAY_ADDRESS set, `rr-ray` joins that cluster instead of starting its own Ray."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.procs import free_port, stop

ROOT = Path(__file__).resolve().parents[1]
# A token of this test's own (RAY_AUTH_TOKEN outranks ~/.ray/auth_token): heads that other tests start at the
# same time (pytest -n 2) must not race on that shared file.
TOKEN = secrets.token_hex(32)


@pytest.fixture
def ray_head(tmp_path: Path):
    """A real head node on 127.0.0.1 run with --block, so terminating it stops exactly its own processes."""
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_TOKEN": TOKEN}
    env.pop("RAY_ADDRESS", None)
    ray_bin = Path(sys.executable).with_name("ray")
    log = open(tmp_path / "head.log", "w")
    temp_dir = tempfile.mkdtemp(prefix="rr-ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None, (tmp_path / "head.log").read_text()
        time.sleep(0.5)
    time.sleep(2)  # the GCS port opens before the raylet has registered
    try:
        yield address
    finally:
        stop(proc, timeout=60, group=True)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_run_joins_the_cluster_named_by_ray_address(ray_head: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    # The head enabled token auth by itself; a client must say so (README, "Joining a cluster").
    env = {**os.environ, "RAY_ADDRESS": ray_head, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    res = subprocess.run(
        [sys.executable, "-m", "rr_ray", "reveal", "--set", f"run.dir={tmp_path / 'run'}",
         "--set", f"model.name_or_path={tiny_model_dir}", "--set", "task.num_contexts=3",
         "--set", "reveal.mode=direct", "--set", "reveal.response_max_tokens=4",
         "--set", "generation.cpus_per_actor=1", "--set", "generation.dtype=float32"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["ray"] == ray_head
    assert summary["forget_size"] == 3
