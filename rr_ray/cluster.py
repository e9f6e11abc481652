"""Joining Ray: the cluster named by config or RAY_ADDRESS, else a local Ray started on 127.0.0.1."""

from __future__ import annotations

import json
import os

import ray

from rr_ray.config import RayConfig
from rr_ray.evaluation.sandbox import ALLOW_UNISOLATED_ENV

# Passed to every worker so actors on any node resolve models offline, share our cache layout and reach the
# same object store, and run model-written code only as the config's sandbox.allow_unisolated says (the CLI
# sets that variable). No secrets: a runtime env is readable by anyone who can list the cluster's jobs.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "RR_RAY_CACHE", "AWS_DEFAULT_REGION",
                  "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", ALLOW_UNISOLATED_ENV)
# Forwarded only on request (ray.forward_aws_credentials), and then together: temporary (STS) keys are
# useless without their session token.
AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def worker_env(cfg: RayConfig, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The env vars every worker gets from the driver (see ``_FORWARDED_ENV`` and ``AWS_CREDENTIALS``)."""
    environ = dict(os.environ if environ is None else environ)
    names = _FORWARDED_ENV + (AWS_CREDENTIALS if cfg.forward_aws_credentials else ())
    env = {k: environ[k] for k in names if k in environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key in _job_env_vars():
        env.pop(key, None)
    return env


def _job_env_vars() -> set[str]:
    """Env var names the runtime_env of a `ray job submit` job already sets (empty outside a job driver).

    Ray merges the job's runtime_env with the driver's ray.init(runtime_env=...) and refuses any key set
    by both; the job's values reach every worker anyway, so we leave those keys to the job.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    runtime_env = json.loads(raw).get("runtime_env") or {}
    return set(runtime_env.get("env_vars") or {})


def connect(cfg: RayConfig | None = None) -> str:
    """Initialise Ray once per process and return the address joined ("local" for a fresh local Ray)."""
    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return "existing"
    env = worker_env(cfg)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    common = dict(namespace=cfg.namespace, runtime_env={"env_vars": env}, log_to_driver=True)
    if address:
        ray.init(address=address, **common)
        return address
    # Keep every port of a local Ray on loopback (Ray otherwise binds the interface address).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # The dashboard serves the state API that Ray Train V2's placement-group cleaner polls every second;
    # without it the cleaner logs a warning per second for the rest of the run. Port: 8265 or the next free.
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", **common)
    return "local"
