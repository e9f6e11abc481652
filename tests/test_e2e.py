"""The real default model (SmolLM2-135M) through `rr-ray run` on configs/tiny.yaml: every stage, a kill -9
in the middle, a resumed rerun that redoes no finished stage, and a final rerun that skips everything."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("reveal", "release", "evaluate", "export", "report")
pytestmark = pytest.mark.e2e


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "rr_ray", "run", str(ROOT / "configs/tiny.yaml"), "--set", f"run.dir={run_dir}"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _run(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run_dir), capture_output=True, text=True, timeout=1200, cwd=ROOT, env=_env())


def _kill_when(run_dir: Path, marker: str, timeout: float = 900) -> None:
    """Start a run and SIGKILL its whole process group as soon as ``marker`` exists."""
    proc = subprocess.Popen(_cmd(run_dir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not (run_dir / marker).exists():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {marker} appeared"
            assert time.time() < deadline, f"{marker} did not appear in {timeout} s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_tiny_run_all_stages_survives_kill_9_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Killed inside release, after its first PEM was trained: reveal is finished, release is half done.
    _kill_when(run_dir, "_done/release-mu_0-train.json")
    assert (run_dir / "_done/reveal.json").exists() and not (run_dir / "_done/release.json").exists()
    forget_mtime = (run_dir / "reveal/forget.jsonl").stat().st_mtime_ns
    pem_mtime = (run_dir / "release/mu_0/adapter/adapter_model.safetensors").stat().st_mtime_ns

    first = _run(run_dir)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "loaded smollm2-135m-instruct: LlamaForCausalLM, 134.5 M parameters" in first.stderr
    assert "stage reveal: already done, skipped" in first.stderr
    # The finished work was not redone: the forget set and the trained PEM are the same files.
    assert (run_dir / "reveal/forget.jsonl").stat().st_mtime_ns == forget_mtime
    assert (run_dir / "release/mu_0/adapter/adapter_model.safetensors").stat().st_mtime_ns == pem_mtime
    for stage in STAGES:
        assert (run_dir / f"_done/{stage}.json").exists(), stage

    rows = [json.loads(line) for line in (run_dir / "reveal/forget.jsonl").read_text().splitlines()]
    assert rows and all(r["prompt"] and "relevance" in r for r in rows)
    log = json.loads((run_dir / "edit_log.json").read_text())
    steps = json.loads((run_dir / "release/steps.json").read_text())
    assert [r["step"] for r in steps] == ["base", "mu_0", "lambda_1", "mu_1"]
    # every accepted step is in the edit log; a rejected one applied weight 0 (rules.on_reject: zero)
    assert [e["step"] for e in log["edits"]] == [r["step"] for r in steps[1:] if r["accepted"]]
    base, final = (json.loads((run_dir / f"eval/{n}.json").read_text()) for n in ("base", "final"))
    assert base["adapter"] is None
    # each model's two sides were evaluated as separate tasks, each kept as it finished, then merged
    for name, merged in (("base", base), ("final", final)):
        for side in ("forget", "utility"):
            part = json.loads((run_dir / f"eval/{name}.{side}.json").read_text())
            assert part[side] == merged[side] and part["adapter"] == merged["adapter"]
    if log["edits"]:
        assert final["adapter"].endswith("release/composed")
        assert final["forget"]["s"] != base["forget"]["s"]  # the edit log changed the model
    assert (run_dir / "export/merged/config.json").exists() and (run_dir / "export/composed_lora").is_dir()
    report = (run_dir / "report/report.md").read_text()
    assert "base" in report.lower() and "mu_0" in report
    # Table 1 for this run: the trained retain PEM against both forget PEMs (accepted or not)
    assert "| lambda_1 | mu_0 |" in report and "| lambda_1 | mu_1 |" in report, report
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert set(summary["stages_s"]) == set(STAGES)

    again = _run(run_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    for stage in STAGES:
        assert f"stage {stage}: already done, skipped" in again.stderr
