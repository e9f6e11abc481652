"""The quality config's assets and metrics: the chunked Qwen GGUF (joined, hash-checked, converted, can code),
packaged GSM8K, the larger HumanEval hold-out, and steering on exact metrics."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rr_ray.config import TaskConfig
from rr_ray.models.packaged import ModelNotFoundError, join_parts
from rr_ray.tasks import packaged_data
from rr_ray.tasks.base import limited, steering_scores
from rr_ray.tasks.code import CodeTask
from rr_ray.tasks.math import MATH_TEMPLATE, MathUtility, load_gsm8k


def test_join_parts_checks_the_hash_and_leaves_nothing_on_mismatch(tmp_path: Path) -> None:
    parts = []
    for i, chunk in enumerate((b"GGUF" + b"a" * 1000, b"b" * 7, b"")):
        parts.append(tmp_path / f"part{i}.bin")
        parts[-1].write_bytes(chunk)
    whole = b"".join(p.read_bytes() for p in parts)
    out = join_parts(parts, tmp_path / "model.gguf", hashlib.sha256(whole).hexdigest())
    assert out.read_bytes() == whole
    with pytest.raises(ModelNotFoundError, match="not the published ones"):
        join_parts(list(reversed(parts)), tmp_path / "other.gguf", hashlib.sha256(whole).hexdigest())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "part0.bin", "part1.bin", "part2.bin"]


def test_gsm8k_is_the_published_test_set_with_worked_answers() -> None:
    rows = load_gsm8k()
    assert len(rows) == 1319
    first = rows[0]
    assert first["target"] == 18.0 and first["answer"].endswith("The answer is 18.")
    assert "<<" not in first["answer"] and "16 - 3 - 4 = 9" in first["answer"]
    util = MathUtility(rows)
    assert len(util.eval_rows) == 500 and len(util.retain_rows) == 819
    held = {r["question"] for r in util.eval_rows}
    assert not held & {r["question"] for r in util.retain_rows}
    prompt = MATH_TEMPLATE.format(question=util.retain_rows[0]["question"])
    target = util.retain_rows[0]["target"]
    assert util.is_correct(prompt, f"Step one... so the total is {target:g}.")
    assert not util.is_correct(prompt, f"The total is {target + 1:g}.")
    assert not util.is_correct("a prompt of no problem", "42")


def test_gsm8k_with_another_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "test.jsonl"
    fake.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    monkeypatch.setattr(packaged_data, "package_file", lambda package, rel: fake)
    with pytest.raises(ValueError, match="is not GSM8K's test set"):
        load_gsm8k()


def test_code_eval_size_holds_out_two_halves_and_keeps_contexts() -> None:
    task = CodeTask(TaskConfig(code_eval_size=128, utility_data="gsm8k"))
    assert len(task.eval_problems) == 128 and len(task.pool) == 36
    test, val = limited(task.eval_problems, None, "test"), limited(task.eval_problems, None, "validation")
    assert len(test) == len(val) == 64 and not {p["task_id"] for p in test} & {p["task_id"] for p in val}
    small = CodeTask(TaskConfig())
    assert {p["task_id"] for p in small.eval_problems} <= {p["task_id"] for p in task.eval_problems}
    assert len(task.retain_data(4)) == 4 and task.retain_data(1)[0]["response"].startswith(
        task.utility.retain_rows[0]["answer"][:20])


def test_exact_steering_puts_the_task_metric_in_s_and_u(tiny_model_dir: Path) -> None:
    from rr_ray.evaluation.scoring import Scorer

    scorer = Scorer.from_model_dir(tiny_model_dir, batch_size=4, threads=1)
    exact = TaskConfig(forget_metric="exact", utility_metric="exact", eval_max_new_tokens=8)
    task = CodeTask(exact)
    forget, utility = steering_scores(task, exact, scorer, None, 2, full=False, part="validation")
    assert forget["s_metric"] == "pass@1" and forget["s"] == forget["pass@1"] and "s_proxy" in forget
    assert utility["u_metric"] == "math_accuracy" and utility["u"] == utility["math_accuracy"]
    proxy = TaskConfig(eval_max_new_tokens=8)
    forget, utility = steering_scores(CodeTask(proxy), proxy, scorer, None, 2, full=False, part="validation")
    assert forget["s_metric"] == "proxy" and "pass@1" not in forget and "s_proxy" not in forget
    assert 0 < forget["s"] <= 1 and 0 < utility["u"] <= 1


@pytest.mark.e2e
def test_packaged_qwen_converts_and_writes_a_passing_function(tmp_path: Path) -> None:
    """The chunk wheels join to the published GGUF; the converted model writes code that passes a test."""
    from rr_ray.evaluation.sandbox import SandboxLimits, run_python
    from rr_ray.evaluation.scoring import Scorer
    from rr_ray.generation.base import SamplingParams
    from rr_ray.models.loader import describe_model, resolve_model
    from rr_ray.tasks.code import extract_code

    local = resolve_model("qwen2.5-coder-0.5b-instruct")
    info = describe_model(local)
    assert info["architecture"] == "Qwen2ForCausalLM" and info["parameters"] == 630_167_424
    assert json.loads((local / "config.json").read_text())["tie_word_embeddings"] is False  # own output layer
    scorer = Scorer.from_model_dir(local, batch_size=1)
    prompt = "Write a Python function is_palindrome(s) that returns True when s reads the same backwards."
    reply = scorer.generate([prompt], SamplingParams(max_new_tokens=96, stop=("\n```\n",)))[0][0]
    code = extract_code(reply)
    test = "\nassert is_palindrome('abba') and is_palindrome('') and not is_palindrome('ab')\nprint('ok')\n"
    result = run_python(code + test, SandboxLimits(wall_s=10, cpu_s=5))
    assert result.ok and "ok" in result.stdout, reply
