"""`rr-ray evaluate --edit-log`: base + an edit log equals base + its composed adapter; bad logs are one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.handmade_run import make_release_run

ROOT = Path(__file__).resolve().parents[1]


def _evaluate(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "rr_ray", "evaluate", "--task", "code", "--model", str(model),
                           "--limit", "2", "--set", f"run.dir={out}", "--set", "task.eval_max_new_tokens=4", *extra],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def test_edit_log_scores_like_its_composed_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    run, _ = make_release_run(tiny_model_dir, tmp_path / "run")
    root = Path(run.uri)
    by_log = _evaluate(tiny_model_dir, tmp_path / "a", "--edit-log", str(root / "edit_log.json"))
    assert by_log.returncode == 0, by_log.stderr[-3000:]
    by_adapter = _evaluate(tiny_model_dir, tmp_path / "b", "--adapter", str(root / "release/composed"))
    assert by_adapter.returncode == 0, by_adapter.stderr[-3000:]
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (by_log, by_adapter))
    assert abs(a["forget"]["s"] - b["forget"]["s"]) < 1e-5 and abs(a["utility"]["u"] - b["utility"]["u"]) < 1e-5
    base = json.loads(_evaluate(tiny_model_dir, tmp_path / "c").stdout.strip().splitlines()[-1])
    assert abs(a["forget"]["s"] - base["forget"]["s"]) > 1e-6  # the edits change the model


def test_bad_edit_log_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "edit_log.json"
    bad.write_text(json.dumps({"edits": []}))
    res = _evaluate(tiny_model_dir, tmp_path / "a", "--edit-log", str(bad))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--edit-log" in res.stderr, res.stderr
