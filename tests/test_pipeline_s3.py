"""`rr-ray run` into an s3:// run directory on a real S3 server, then resumed from it."""

import json
import os
import subprocess
import sys
from pathlib import Path

from rr_ray.storage import RunDir

ROOT = Path(__file__).resolve().parents[1]


def _run(uri: str, endpoint: str, model_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "rr_ray", "run", "--set", f"run.dir={uri}", "--set", f"run.s3_endpoint_url={endpoint}",
         "--set", f"model.name_or_path={model_dir}", "--set", "task.num_contexts=3",
         "--set", "generation.max_new_tokens=4", "--set", "generation.dtype=float32"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_run_writes_to_s3_and_resumes(s3_server: str, s3_uri: str, tiny_model_dir: Path) -> None:
    first = _run(s3_uri, s3_server, tiny_model_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.strip().splitlines()[-1])["run_dir"] == s3_uri
    run = RunDir.open(s3_uri, endpoint_url=s3_server)
    assert run.is_done("generate")
    assert len(run.read_jsonl("generate/samples.jsonl")) == 3
    assert set(run.manifest()) >= {"run.yaml", "generate/samples.jsonl", "generate/stats.json"}
    second = _run(s3_uri, s3_server, tiny_model_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stage generate: already done (3 rows), skipped" in second.stderr
