"""The real default model scored by `rr-ray evaluate` on the shipped custom example (a few items)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def test_evaluate_custom_example_on_smollm2(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "rr_ray", "evaluate", "configs/custom_example.yaml", "--limit", "3",
                          "--set", f"run.dir={tmp_path / 'run'}", "--set", "task.eval_max_new_tokens=32"],
                         capture_output=True, text=True, timeout=170, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "eval" / "custom.json").read_text())
    assert saved["model"] == "smollm2-135m-instruct" and saved["forget"]["eval_prompts"] == 3
    assert 0.0 <= saved["forget"]["s"] <= 1.0
    assert 0.0 < saved["utility"]["u"] <= 1.0 and saved["utility"]["retain_loglik"] < 0
