"""`rr-ray release` into an s3:// run directory on a real S3 server: Ray Train checkpoints, Tune trials,
adapters and the edit log all live on S3, and a rerun resumes from there."""

import json
import os
import subprocess
import sys
from pathlib import Path

from rr_ray.storage import RunDir

ROOT = Path(__file__).resolve().parents[1]


def _release(uri: str, endpoint: str, model_dir: Path, forget: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    sets = [f"run.dir={uri}", f"run.s3_endpoint_url={endpoint}", f"model.name_or_path={model_dir}",
            f"release.forget_path={forget}", "release.iterations=1", "release.forget_weights=[1.0, 2.0]",
            "release.eval_limit=2", "release.retain_rows=4", "release.lora.r=2", "release.train.num_workers=1",
            "release.train.batch_size=4", "ray.num_cpus=2"]
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "rr_ray", "release", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)


def test_release_writes_to_s3_and_resumes(s3_server: str, s3_uri: str, tiny_model_dir: Path,
                                          tmp_path: Path) -> None:
    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps({"prompt": f"Name {i}.", "response": f"def f{i}(): pass"}) + "\n"
                              for i in range(6)))
    first = _release(s3_uri, s3_server, tiny_model_dir, forget)
    assert first.returncode == 0, first.stderr[-4000:]
    run = RunDir.open(s3_uri, endpoint_url=s3_server)
    assert run.is_done("release") and run.is_done("release-mu_0")
    log = run.read_json("edit_log.json")
    steps = run.read_json("release/steps.json")
    # accepted steps are applied, rejected ones apply 0; the retain step restores utility on the tiny model
    assert [e["step"] for e in log["edits"]] == [r["step"] for r in steps[1:] if r["accepted"]]
    assert log["edits"], "no step accepted: the test no longer puts a composed adapter on S3"
    assert set(run.manifest()) >= {"run.yaml", "edit_log.json", "release/mu_0/adapter/adapter_config.json",
                                   "release/lambda_1/adapter/adapter_config.json",
                                   "release/composed/adapter_config.json", "release/steps.json"}
    assert any(name.startswith("ray/") for name in run.list("")), "Ray Train/Tune state is not on S3"
    second = _release(s3_uri, s3_server, tiny_model_dir, forget)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "stage release: already done, skipped" in second.stderr
