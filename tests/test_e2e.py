"""The real default model (SmolLM2-135M) through `rr-ray run` on configs/tiny.yaml, then a resumed rerun."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _run(run_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "rr_ray", "run", str(ROOT / "configs/tiny.yaml"),
                           "--set", f"run.dir={run_dir}"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env=env)


def test_tiny_run_writes_a_complete_run_directory_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _run(run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "loaded smollm2-135m-instruct: LlamaForCausalLM, 134.5 M parameters" in first.stderr
    assert "run directory:" in first.stderr

    rows = [json.loads(line) for line in (run_dir / "generate/samples.jsonl").read_text().splitlines()]
    assert [r["context_id"] for r in rows] == [0, 1, 2, 3]
    assert all(0 < r["num_tokens"] <= 16 and r["response"].strip() for r in rows)
    assert all("```python" in r["prompt"] for r in rows)  # HumanEval problems as code contexts

    manifest = json.loads((run_dir / "manifest.json").read_text())
    for rel in ("run.yaml", "generate/samples.jsonl", "generate/stats.json"):
        assert manifest[rel]["sha256"] == hashlib.sha256((run_dir / rel).read_bytes()).hexdigest()
    done = json.loads((run_dir / "_done/generate.json").read_text())
    assert done["rows"] == 4 and done["actors"] == 2
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["generate"]["new_tokens"] == sum(r["num_tokens"] for r in rows)

    before = (run_dir / "generate/samples.jsonl").stat().st_mtime_ns
    second = _run(run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stage generate: already done (4 rows), skipped" in second.stderr
    assert (run_dir / "generate/samples.jsonl").stat().st_mtime_ns == before
