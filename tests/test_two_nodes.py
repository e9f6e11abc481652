"""A two-node Ray cluster on 127.0.0.1: a head that does no work (0 CPUs, as the cluster specs run it) and a
worker node with its own temp dir and its own RR_RAY_CACHE. `ray job submit --working-dir .` of the code job
(the README's command verbatim: jobs/runtime_env.yaml's upload excludes, and env vars that collide with the
ones rr_ray.cluster.connect forwards, which the job driver must leave to the job) runs the whole pipeline; the
generator actors, Ray Train workers, Tune trials and the evaluate task can only run on the second node, which
resolves the packaged model into its own cache itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.procs import free_port, stop
from tests.test_jobs_submit import AUTH, RAY_BIN, ROOT, _client, _job_status, _wait_http


def _start(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


@pytest.fixture
def two_nodes(tmp_path: Path):
    """(job server address, GCS address, worker node's cache dir, both temp dirs); both stopped afterwards."""
    env = {**os.environ, **AUTH, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
           "PATH": f"{RAY_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RR_RAY_CACHE", None)
    head_ports = {k: free_port() for k in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                          "dashboard-agent-grpc-port", "metrics-export-port",
                                          "runtime-env-agent-port", "ray-client-server-port",
                                          "node-manager-port", "object-manager-port")}
    head_tmp = tempfile.mkdtemp(prefix="rr-h-", dir="/tmp")  # socket paths must stay under 107 bytes
    node_tmp = tempfile.mkdtemp(prefix="rr-n-", dir="/tmp")
    cache = tmp_path / "node2-cache"
    head = _start([str(RAY_BIN), "start", "--head", "--block", "--num-cpus=0", "--node-ip-address=127.0.0.1",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   *[f"--{k}={v}" for k, v in head_ports.items()], f"--temp-dir={head_tmp}",
                   "--disable-usage-stats"], {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}, tmp_path / "head.log")
    procs = [head]
    try:
        address = f"http://127.0.0.1:{head_ports['dashboard-port']}"
        _wait_http(f"{address}/api/version", head, tmp_path / "head.log")
        gcs = f"127.0.0.1:{head_ports['port']}"
        node_ports = {k: free_port() for k in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                               "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                               "runtime-env-agent-port")}
        node = _start([str(RAY_BIN), "start", f"--address={gcs}", "--block", "--num-cpus=2",
                       "--node-ip-address=127.0.0.1",
                       *[f"--{k}={v}" for k, v in node_ports.items()], f"--temp-dir={node_tmp}",
                       "--disable-usage-stats"],
                      # "0" keeps a lone node on loopback but refuses a second node (and makes the head advertise
                      # the host's address); both nodes are pinned to 127.0.0.1 by --node-ip-address instead.
                      {**env, "RR_RAY_CACHE": str(cache), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},
                      tmp_path / "node.log")
        procs.append(node)
        code = ("import ray,sys,time; ray.init(address=sys.argv[1]); d=time.time()+120\n"
                "while ray.cluster_resources().get('CPU',0)<2 and time.time()<d: time.sleep(0.5)\n"
                "print(ray.cluster_resources().get('CPU',0))")
        res = _client([sys.executable, "-c", code, gcs], timeout=180)
        assert res.returncode == 0 and res.stdout.strip().endswith("2.0"), \
            res.stderr[-2000:] + (tmp_path / "node.log").read_text()[-2000:]
        yield address, gcs, cache, (Path(head_tmp), Path(node_tmp))
    finally:
        for proc in reversed(procs):
            stop(proc, timeout=60, group=True)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(node_tmp, ignore_errors=True)


def _actor_nodes(address: str) -> dict[str, set[str]]:
    """class name -> node ids of every actor the cluster ran (Ray's state API, dead actors included)."""
    code = ("import json,sys; from ray.util.state import list_actors, list_nodes; u=sys.argv[1]; out={}\n"
            "for a in list_actors(address=u, limit=10000, detail=True): out.setdefault(a.class_name, []).append("
            "a.node_id)\n"
            "heads=[n.node_id for n in list_nodes(address=u, detail=True) if n.is_head_node]\n"
            "print(json.dumps({'actors': out, 'head': heads}))")
    res = _client([sys.executable, "-c", code, address], timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout.strip().splitlines()[-1])
    return {k: set(v) for k, v in data["actors"].items()} | {"__head__": set(data["head"])}


@pytest.mark.e2e
def test_submitted_job_runs_its_work_on_the_worker_node_of_a_two_node_cluster(two_nodes, tmp_path: Path) -> None:
    address, _, cache, temp_dirs = two_nodes
    run_dir = tmp_path / "run"
    job_id = f"rr-two-{os.getpid()}"
    t0 = time.perf_counter()
    sub = _client([str(RAY_BIN), "job", "submit", "--address", address, "--submission-id", job_id,
                   "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
                   "python", "jobs/code_unlearn.py", "--config", "configs/tiny.yaml", "--set", f"run.dir={run_dir}",
                   # One release step keeps CI short; test_e2e runs the tiny config's full eq. 1 loop.
                   "--set", "release.iterations=0"], timeout=1500)
    out = sub.stdout + sub.stderr
    print(f"two-node job: {time.perf_counter() - t0:.1f} s, rc {sub.returncode}")
    assert _job_status(address, job_id) == "SUCCEEDED" and sub.returncode == 0, out[-4000:]

    # The driver and its workers ran the uploaded copy of the repo, not the checkout this test runs from.
    m = re.search(r"rr_ray from (\S+),", out)
    assert m, out[-4000:]
    workdir = Path(m.group(1)).parent
    assert workdir.resolve() != ROOT.resolve() and any(t in workdir.parents for t in temp_dirs), workdir
    uploaded = sorted(p.name for p in workdir.iterdir())
    print(f"uploaded working dir {workdir}: {uploaded}")
    assert {"rr_ray", "jobs", "configs"} <= set(uploaded)
    assert not {".venv", "runs", "results", ".git"} & set(uploaded), uploaded

    # Every stage left its done-marker; the config is the resolved tiny one; the job joined this cluster.
    for stage in ("reveal", "release", "evaluate", "export", "report"):
        assert (run_dir / "_done" / f"{stage}.json").is_file(), stage
    cfg = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert cfg["task"]["name"] == "code" and cfg["model"]["name_or_path"] == "smollm2-135m-instruct"
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert summary["run_dir"] == str(run_dir) and summary["ray"] not in ("local", "existing")
    assert (run_dir / "export/merged/config.json").is_file() and (run_dir / "report/report.md").is_file()

    # The worker node resolved the packaged model itself, into its own cache (the head has no CPU to do it).
    assert (cache / "models" / "smollm2-135m-instruct" / "config.json").is_file(), sorted(cache.rglob("*"))
    nodes = _actor_nodes(address)
    head = nodes.pop("__head__")
    ran = {name: ids for name, ids in nodes.items()
           if name in ("GeneratorWorker", "RayTrainWorker", "ImplicitFunc") or "Trainable" in name
           or "score_trial" in name}
    print(f"actors by node: { {k: len(v) for k, v in ran.items()} }")
    assert "GeneratorWorker" in ran and any("Train" in k for k in ran), sorted(nodes)
    for name, ids in ran.items():
        assert not ids & head, f"{name} ran on the head node"
