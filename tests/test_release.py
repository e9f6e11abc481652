"""The Release loop (eq. 1) on the tiny model: steps, files, edit log, resume without redoing work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rr_ray.config import load_config
from rr_ray.release.loop import plan, run_release, step_label
from rr_ray.release.pem import EditLog
from rr_ray.storage import RunDir


def test_plan_follows_equation_1() -> None:
    assert plan(0) == [("mu_0", "forget")]
    assert plan(2) == [("mu_0", "forget"), ("lambda_1", "retain"), ("mu_1", "forget"),
                       ("lambda_2", "retain"), ("mu_2", "forget")]


def test_step_labels() -> None:
    assert step_label({"kind": "base"}) == "Base model"
    assert step_label({"kind": "forget", "step": "mu_0", "coef": -2.0}) == "-mu_0 = -2"
    assert step_label({"kind": "retain", "step": "lambda_1", "coef": 0.3}) == "+lambda_1 = +0.3"


def _config(tmp: Path, model: Path, forget: Path):
    return load_config(None, [
        f"run.dir={tmp / 'run'}", f"model.name_or_path={model}", "ray.num_cpus=2",
        "release.iterations=1", f"release.forget_path={forget}", "release.retain_rows=8",
        "release.eval_limit=4", "release.forget_weights=[1.0, 4.0]", "release.retain_weights=[0.5, 1.0]",
        "release.lora.r=4", "release.lora.alpha=8", "release.train.num_workers=2", "release.train.epochs=1",
        "release.train.batch_size=4",
    ])


def test_release_loop_writes_every_step_and_resumes(tiny_model_dir: Path, tmp_path: Path, ray_local) -> None:
    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps({"prompt": f"Write add_{i}(x).",
                                          "response": f"def add_{i}(x):\n    return x + {i}\n"}) + "\n"
                              for i in range(12)))
    cfg = _config(tmp_path, tiny_model_dir, forget)
    run = RunDir.open(cfg.run.dir)
    summary = run_release(cfg, run)

    log = EditLog.from_json(run.read_json("edit_log.json"))
    assert [e.step for e in log.edits] == ["mu_0", "lambda_1", "mu_1"]
    assert log.edits[0].coef in (-1.0, -4.0) and log.edits[1].coef in (0.5, 1.0) and log.edits[2].coef < 0
    steps = run.read_json("release/steps.json")
    assert [s["step"] for s in steps] == ["base", "mu_0", "lambda_1", "mu_1"]
    for rec in steps[1:]:
        trials = run.read_jsonl(f"release/{rec['step']}/trials.jsonl")
        assert len(trials) == 2 and rec["coef"] in [t["coef"] for t in trials]
        assert run.exists(f"release/{rec['step']}/adapter/adapter_config.json")
        assert run.exists(f"release/{rec['step']}/composed/adapter_config.json")
    # The final composed LoRA stacks all three PEMs: its rank is the sum of theirs.
    final = json.loads(run.read_text("release/composed/adapter_config.json"))
    assert final["r"] == 3 * 4
    assert run.read_bytes("release/metrics.png")[:4] == b"\x89PNG"
    assert summary["s_final"] == steps[-1]["s"] and summary["s_base"] == steps[0]["s"]

    # A rerun skips every finished step and returns the same result without training or sweeping again.
    marker = run.done_info("release")
    again = run_release(cfg, run)
    assert again["edit_log"] == summary["edit_log"] and again["s_final"] == summary["s_final"]
    assert run.done_info("release-mu_0-train") is not None
    assert marker is not None


def test_missing_forget_set_is_one_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, tiny_model_dir, tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="release.forget_path"):
        run_release(cfg, RunDir.open(cfg.run.dir))
