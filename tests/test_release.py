"""The Release loop (eq. 1) on the tiny model: steps, files, edit log, resume without redoing work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rr_ray.config import load_config
from rr_ray.release.loop import plan, run_release, step_label, stop_reason
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


def test_stop_conditions() -> None:
    base = {"index": 0, "step": "base", "kind": "base", "s": 0.5, "u": 0.2}
    mu = {"index": 1, "step": "mu_0", "kind": "forget", "accepted": True, "s": 0.04, "u": 0.19}
    lam = {"index": 2, "step": "lambda_1", "kind": "retain", "accepted": True, "s": 0.2, "u": 0.05}
    cfg = load_config(None, ["release.forget_target=0.1", "release.utility_floor=0.85", "release.iterations=3"])
    assert "forget target met" in stop_reason(cfg, [base, mu])
    assert stop_reason(cfg, [base, mu, lam]) is None  # the retain step gave s back: go on
    # a retain step that keeps s at the target and u above the floor ends the release (mu_1 could only cost u)
    assert "forget target met" in stop_reason(cfg, [base, mu | {"u": 0.1}, lam | {"s": 0.04, "u": 0.19}])
    assert stop_reason(cfg, [base, mu | {"s": 0.3}, lam | {"s": 0.3, "u": 0.01}]) is None
    # the target met at a utility below the floor: the next retain step is there to restore it
    assert stop_reason(cfg, [base, mu | {"u": 0.1}]) is None
    mu_1 = mu | {"index": 3, "step": "mu_1"}
    assert stop_reason(cfg, [base, mu, lam, mu_1 | {"u": 0.1}]) is None
    assert "forget target met" in stop_reason(cfg, [base, mu, lam, mu_1])
    weak = mu | {"s": 0.3}
    assert stop_reason(cfg, [base, weak]) is None
    # neither: give up only once a retain step has had its chance (mu_1 on)
    assert stop_reason(cfg, [base, weak | {"u": 0.1}]) is None
    assert "utility below its floor" in stop_reason(cfg, [base, mu, lam, mu_1 | {"s": 0.3, "u": 0.1}])
    rejected = weak | {"accepted": False}
    assert stop_reason(cfg, [base, rejected]) is None  # on_reject: zero goes on
    stop = load_config(None, ["release.rules.on_reject=stop"])
    assert "on_reject: stop" in stop_reason(stop, [base, rejected])
    assert stop_reason(load_config(None), [base, mu]) is None  # no target set: iterations decide


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
    steps = run.read_json("release/steps.json")
    assert [s["step"] for s in steps] == ["base", "mu_0", "lambda_1", "mu_1"]
    # Accepted steps are in the edit log; a rejected one applied 0 and kept its best candidate on record only.
    assert [e.step for e in log.edits] == [r["step"] for r in steps[1:] if r["accepted"]]
    assert all(e.coef == r["coef"] != 0 for e, r in zip(log.edits, [r for r in steps[1:] if r["accepted"]]))
    for rec in steps[1:]:
        trials = run.read_jsonl(f"release/{rec['step']}/trials.jsonl")
        assert len(trials) == 2 and rec["best_candidate"] in [t["coef"] for t in trials]
        if not rec["accepted"]:
            assert rec["coef"] == 0.0 and (rec["s"], rec["u"]) == (steps[rec["index"] - 1]["s"],
                                                                   steps[rec["index"] - 1]["u"])
        assert run.exists(f"release/{rec['step']}/adapter/adapter_config.json")
    assert log.edits, "the tiny model accepted no step: the test no longer exercises composition"
    # The final composed LoRA stacks the applied PEMs: its rank is the sum of theirs.
    final = json.loads(run.read_text("release/composed/adapter_config.json"))
    assert final["r"] == len(log.edits) * 4
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


def test_self_retain_data_asks_in_chunks_keeps_them_and_refuses_an_empty_set(
        tiny_model_dir: Path, tmp_path: Path, ray_local) -> None:
    from rich.console import Console

    from rr_ray.release.loop import SELF_RETAIN_MAX_ASKED, self_retain_rows
    from rr_ray.tasks.base import get_task

    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", f"model.name_or_path={tiny_model_dir}",
                             "release.retain_source=self", "task.eval_max_new_tokens=4", "generation.cpus_per_actor=1"])
    run = RunDir.open(cfg.run.dir)
    task = get_task(cfg.task)
    # the random tiny model answers no math problem right: every chunk is asked, kept, then refused
    with pytest.raises(ValueError, match="answered none of 10 retain prompts"):
        self_retain_rows(cfg, run, task, 2, Console(quiet=True))
    asked = run.read_jsonl("release/retain_self_asked.jsonl")
    assert len(asked) == 2 * SELF_RETAIN_MAX_ASKED and not any(r["correct"] for r in asked)
    assert [r["prompt"] for r in asked] == [r["prompt"] for r in task.retain_data(10)]
    # the oracle is the task's: a right final number counts
    row = task.utility.retain_rows[0]
    assert task.check_retain(task.retain_data(1)[0]["prompt"], f"so it is {row['target']:g}")


def test_a_forget_set_on_s3_is_read_from_there(s3_server: str, s3_uri: str, tmp_path: Path) -> None:
    """release.forget_path takes an s3:// URI too (compare's ablations read reveal_release's reveal output)."""
    from rr_ray.release.loop import load_forget_rows

    rows = [{"prompt": f"Write f{i}.", "response": f"def f{i}(): pass"} for i in range(3)]
    RunDir.open(s3_uri, endpoint_url=s3_server).write_jsonl("reveal/forget.jsonl", rows)
    sets = [f"run.dir={tmp_path / 'run'}", f"run.s3_endpoint_url={s3_server}"]
    cfg = load_config(None, [*sets, f"release.forget_path={s3_uri}/reveal/forget.jsonl"])
    got = load_forget_rows(cfg, RunDir.open(cfg.run.dir))
    assert [(r["prompt"], r["response"]) for r in got] == [(r["prompt"], r["response"]) for r in rows]
    missing = load_config(None, [*sets, f"release.forget_path={s3_uri}/reveal/none.jsonl"])
    with pytest.raises(FileNotFoundError, match="release.forget_path"):
        load_forget_rows(missing, RunDir.open(missing.run.dir))
    assert not (tmp_path / "run").exists()
