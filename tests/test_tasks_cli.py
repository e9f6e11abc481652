"""``rr-ray evaluate`` on the tiny model: prints the table, writes eval/<task>.json, rejects bad adapters."""

import json
from pathlib import Path

import pytest

from rr_ray.cli import main


def test_evaluate_writes_scores(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    rc = main(["evaluate", "--task", "ner", "--model", str(tiny_model_dir), "--limit", "2",
               "--set", f"run.dir={run}", "--set", "task.eval_max_new_tokens=8"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    saved = json.loads((run / "eval" / "ner.json").read_text())
    assert saved["task"] == "ner" and saved["limit"] == 2 and saved["adapter"] is None
    assert 0 < saved["forget"]["s"] <= 1 and 0 < saved["utility"]["u"] <= 1 and "person_f1" in saved["forget"]
    assert "person_f1" in out.err  # the rich table goes to the console (stderr)
    assert json.loads(out.out.strip().splitlines()[-1])["forget"] == saved["forget"]


def test_evaluate_rejects_a_non_adapter_dir(tiny_model_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    rc = main(["evaluate", "--task", "code", "--model", str(tiny_model_dir), "--adapter", str(tmp_path),
               "--set", f"run.dir={tmp_path / 'run'}"])
    assert rc == 2 and "not a PEFT adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
