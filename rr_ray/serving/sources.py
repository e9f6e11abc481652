"""What a serving replica loads: the base model directory and the composed LoRA of a finished run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from filelock import FileLock

from rr_ray.models.loader import cache_root
from rr_ray.storage import RunDir

# Where a run keeps its composed edit log as one PEFT LoRA dir (design: any edit log is exactly one LoRA of
# summed rank), first match wins. The only place that knows the run layout: change it here.
COMPOSED_ADAPTER_DIRS = ("export/composed_lora", "release/composed")
ADAPTER_CONFIG = "adapter_config.json"


def adapter_from_run(run_uri: str, endpoint_url: str | None = None, cache_dir: str | None = None) -> str | None:
    """The local path of the run's composed LoRA dir (downloaded once from S3), or None if it has none."""
    run = RunDir.open(run_uri, endpoint_url=endpoint_url)
    for rel in COMPOSED_ADAPTER_DIRS:
        if not run.exists(f"{rel}/{ADAPTER_CONFIG}"):
            continue
        local = run.local_path(rel)
        if local is not None:
            return str(local)
        target = cache_root(cache_dir) / "adapters" / hashlib.sha256(run.uri.encode() + rel.encode()).hexdigest()[:16]
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / ADAPTER_CONFIG).is_file():
                run.download_dir(rel, target)
        return str(target)
    return None


def model_from_run(run_uri: str, endpoint_url: str | None = None) -> str | None:
    """The base model reference recorded in the run's resolved config (run.yaml), or None without one."""
    run = RunDir.open(run_uri, endpoint_url=endpoint_url)
    if not run.exists("run.yaml"):
        return None
    data = yaml.safe_load(run.read_text("run.yaml")) or {}
    return (data.get("model") or {}).get("name_or_path")


def check_adapter_dir(path: str) -> str:
    """A local PEFT LoRA dir, or a one-line error naming what is missing."""
    if not (Path(path).expanduser() / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT LoRA adapter directory)")
    return str(Path(path).expanduser())


def model_and_adapter(model: str | None, adapter: str | None, run: str | None, endpoint_url: str | None = None,
                      cache_dir: str | None = None) -> tuple[str, str | None]:
    """What to serve: the base model reference (given, else the run's) and a local composed LoRA dir or None."""
    model_ref = model or (model_from_run(run, endpoint_url) if run else None)
    if not model_ref:
        raise ValueError(f"{run}: no run.yaml naming the model; pass model explicitly")
    local = check_adapter_dir(adapter) if adapter else (adapter_from_run(run, endpoint_url, cache_dir) if run else None)
    return model_ref, local
