"""The shipped cluster configs (clusters/) and job entry points (jobs/) say what rr-ray relies on.

Checked with Ray's own validators where Ray has them: the cluster launcher's JSON schema (ray-schema.json,
through ray.autoscaler's validate_config after the same default-filling `ray up` does), RuntimeEnv for
runtime envs, and Serve's ServeDeploySchema for the RayService's serveConfigV2.
"""

import copy
import runpy
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from rr_ray.config import load_config
from rr_ray.jobs import parse_job_args

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
KUBERAY = {kind: CLUSTERS / "kuberay" / name for kind, name in
           [("RayCluster", "raycluster.yaml"), ("RayJob", "rayjob-code.yaml"), ("RayService", "rayservice.yaml")]}
TASKS = ("code", "toxicity", "ner")


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside any of the three KubeRay kinds."""
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _check_remote_runtime_env(env: dict[str, Any]) -> None:
    """In-cluster submitters cannot upload a local dir: the repo comes as an archive, rr-ray[gpu] via pip."""
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"].startswith(("https://", "s3://", "gs://")) and env["working_dir"].endswith(".zip")
    assert any(p.replace(" ", "").startswith("rr-ray[gpu]@") for p in env["pip"]), env["pip"]


# --- cluster launcher (ray up) ---------------------------------------------------------------------------

def test_aws_launcher_config_is_valid_for_ray_up() -> None:
    pytest.importorskip("jsonschema")  # Ray's validate_config checks against ray-schema.json with it
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(CLUSTERS / "aws-gpu.yaml")
    validate_config(cfg)
    prepared = prepare_config(copy.deepcopy(cfg))  # what `ray up` does before the provider is contacted
    validate_config(prepared)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "four"
    with pytest.raises(Exception, match="four"):  # the schema really checks node types
        validate_config(bad)


def test_aws_launcher_scales_gpu_workers_from_zero_with_the_gpu_extra() -> None:
    cfg = _load(CLUSTERS / "aws-gpu.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu), types
    assert cfg["idle_timeout_minutes"] > 0 and cfg["max_workers"] >= max(t["max_workers"] for t in gpu)

    # The checkout is synced to every node without the venv or run outputs, then installed with [gpu].
    remote = [r for r, local in cfg["file_mounts"].items() if local == "."]
    assert len(remote) == 1
    assert {".venv", "runs"} <= set(cfg["rsync_exclude"])
    name = remote[0].replace("~", "$HOME")
    assert any("pip install" in c and f"{name}[gpu]" in c for c in cfg["setup_commands"]), cfg["setup_commands"]

    # Same Ray on the nodes as on this client; token auth on every node with the token the client holds.
    assert cfg["docker"]["image"].split(":")[1].startswith(ray.__version__ + "-")
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    head_start, worker_start = " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])
    assert "--head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--dashboard-port=8265" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in worker_start and "--port=6379" in head_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start


# --- KubeRay ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KUBERAY))
def test_kuberay_cluster_autoscales_gpu_workers_from_zero(kind: str) -> None:
    doc = _load(KUBERAY[kind])
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = _ray_cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    for c in _containers(spec):
        assert c["image"].split(":")[1].startswith(ray.__version__ + "-"), c["image"]
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # the CRD's map[string]string
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= ports
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, spec["workerGroupSpecs"]
    for g in gpu_groups:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1 and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_rayjob_runs_an_existing_job_file_with_an_existing_config() -> None:
    spec = _load(KUBERAY["RayJob"])["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file() and argv[1].startswith("jobs/"), argv
    task = Path(argv[1]).stem.removesuffix("_unlearn")
    assert task in TASKS
    run_argv = parse_job_args(task, argv[2:])
    config, overrides = run_argv[1], run_argv[3::2]
    assert (ROOT / config).is_file(), config
    cfg = load_config(ROOT / config, overrides)  # the job's config resolves, with the job's task
    assert cfg.task.name == task and cfg.run.dir.startswith("s3://")
    assert spec["shutdownAfterJobFinishes"] is True
    _check_remote_runtime_env(yaml.safe_load(spec["runtimeEnvYAML"]))


def test_rayservice_serves_the_rr_ray_app_from_a_run() -> None:
    from ray.serve.schema import ServeDeploySchema

    doc = _load(KUBERAY["RayService"])
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = serve_cfg.applications
    assert app.import_path == "rr_ray.serving.app:build_app"
    assert app.args["run"].startswith("s3://") and app.args["num_gpus"] >= 1
    _check_remote_runtime_env(app.runtime_env)
    # Serve's HTTP port is open on the pods that host replicas.
    spec = _ray_cluster_spec(doc)
    for c in _containers(spec):
        assert serve_cfg.http_options.port in {p["containerPort"] for p in c.get("ports", [])}, c["name"]


def test_rayservice_args_are_build_app_args() -> None:
    app_module = pytest.importorskip("rr_ray.serving.app")
    doc = _load(KUBERAY["RayService"])
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    args = app_module.ServeArgs(**app["args"])  # pydantic: an unknown or mistyped arg raises here
    assert args.run == app["args"]["run"] and args.backend == "vllm"


# --- jobs/ -----------------------------------------------------------------------------------------------

def test_job_runtime_env_keeps_the_upload_small() -> None:
    from ray.runtime_env import RuntimeEnv

    env = _load(ROOT / "jobs" / "runtime_env.yaml")
    RuntimeEnv(**env)
    assert {".venv/", "runs/", ".git/"} <= set(env["excludes"])


@pytest.mark.parametrize("task", TASKS)
def test_job_entry_points_resolve_their_task(task: str) -> None:
    cfg = load_config(ROOT / "configs" / "default.yaml", parse_job_args(task, [])[3::2])
    assert cfg.task.name == task
    paper = ROOT / "configs" / "paper" / f"{task}.yaml"
    argv = parse_job_args(task, ["--config", str(paper), "--set", "run.dir=s3://b/r"])
    assert load_config(argv[1], argv[3::2]).task.name == task


@pytest.mark.parametrize("task", TASKS)
def test_job_file_runs_rr_ray_run(task: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Each jobs/ file, run as a script, reaches `rr-ray run`: a bad override is its one-line config error."""
    monkeypatch.chdir(ROOT)  # a Ray job's cwd is its working dir
    monkeypatch.setattr(sys, "argv", [f"jobs/{task}_unlearn.py", "--set", "release.lora.r=-1"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "jobs" / f"{task}_unlearn.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert f"rr-ray job {task}:" in err and f"'task.name={task}'" in err
    assert err.strip().splitlines()[-1].startswith("rr-ray: error:") and "release.lora.r" in err, err


def test_no_secret_reaches_the_runtime_env_unless_asked_and_then_with_its_session_token() -> None:
    from rr_ray.cluster import AWS_CREDENTIALS, worker_env

    host = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "sts",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1", "HOME": "/root",
            "HF_HUB_OFFLINE": "1"}
    env = worker_env(load_config(None).ray, host)
    assert not set(env) & set(AWS_CREDENTIALS) and "secret" not in env.values()
    assert env["AWS_ENDPOINT_URL"] == host["AWS_ENDPOINT_URL"] and env["HF_HUB_OFFLINE"] == "1"
    assert "HOME" not in env
    forwarded = worker_env(load_config(None, ["ray.forward_aws_credentials=true"]).ray, host)
    assert {k: forwarded[k] for k in AWS_CREDENTIALS} == {k: host[k] for k in AWS_CREDENTIALS}
