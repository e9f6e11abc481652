"""``rr-ray compare`` on the tiny random model: the built-in baselines (pem_external, ext_sub, dpo, npo) and a user's
method,
loaded by 'module:Class' from outside rr-ray, run in parallel Ray tasks and evaluated with the base on the
same test halves; a rerun skips the finished methods."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

USER_METHOD = '''
import time
from pathlib import Path

from rr_ray.methods.base import MethodResult


class LeaveAsIs:
    """A user's method: no edit at all (the table must show it equal to the base). It waits to see the other
    method's run directory appear, which only happens if the two run at the same time."""

    name = "leave_as_is"

    def run(self, cfg, run):
        sibling = Path(run.uri).parent / "pem_external" / "run.yaml"
        deadline = time.time() + 300
        while not sibling.exists() and time.time() < deadline:
            time.sleep(0.2)
        run.write_json("user/ran.json", {"task": cfg.task.name, "saw_pem_external_running": sibling.exists()})
        return MethodResult(None, {"note": "no edit"})
'''


def _config(tmp_path: Path, model_dir: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    cfg["run"]["dir"] = str(tmp_path / "cmp")
    cfg["model"] = {"name_or_path": str(model_dir)}
    cfg["generation"].update(num_actors=1, dtype="float32")
    cfg["release"].update(iterations=0, forget_weights=[4.0])
    cfg["release"]["train"]["max_length"] = 384  # HumanEval prompts: dpo's pairs need the whole prompt
    cfg["compare"] = {"methods": ["reveal_release", "pem_external", "ext_sub", "dpo", "npo", "user_methods:LeaveAsIs"],
                      "external_rows": 4, "preference_rows": 3,
                      "ablations": ["forget_rule_60", "internal_vs_external"]}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _compare(cfg: Path, plugin_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(plugin_dir), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "rr_ray", "compare", str(cfg)], capture_output=True, text=True,
                          timeout=1500, cwd=ROOT, env=env, check=False)


@pytest.mark.timeout(1800)  # four CLI runs, seven methods: ~7 min alone, past 15 min beside other tests in CI
def test_compare_runs_a_baseline_and_a_user_method_side_by_side(tmp_path: Path, tiny_model_dir: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "user_methods.py").write_text(USER_METHOD)
    cfg = _config(tmp_path, tiny_model_dir)
    first = _compare(cfg, plugins)
    assert first.returncode == 0, first.stderr[-4000:]
    root = tmp_path / "cmp"
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert [r["method"] for r in summary["rows"]] == ["base", "reveal_release", "pem_external", "ext_sub", "dpo",
                                                      "npo", "user_methods:LeaveAsIs", "forget_rule_60"]
    rows = {r["method"]: r for r in summary["rows"]}

    # pem_external: one forget PEM on the task's external rows (pool problems, never evaluation items)
    ext = [json.loads(line) for line in (root / "methods/pem_external/external/forget.jsonl").read_text().splitlines()]
    assert len(ext) == 4 and all(r["prompt"] and r["response"] for r in ext)
    steps = json.loads((root / "methods/pem_external/release/steps.json").read_text())
    assert [s["step"] for s in steps] == ["base", "mu_0"]
    # ext_sub: expert (retain data) and anti-expert (the same external rows) PEMs, the deficiency swept as mu_0
    ext_sub = root / "methods/ext_sub"
    assert (ext_sub / "external/forget.jsonl").read_text() == (root / "methods/pem_external/external/forget.jsonl"
                                                               ).read_text()
    for step in ("expert", "anti_expert", "mu_0"):
        assert (ext_sub / f"release/{step}/adapter/adapter_model.safetensors").is_file(), step
    assert (ext_sub / "release/mu_0/adapter/ext_sub.json").is_file()
    assert [s["step"] for s in json.loads((ext_sub / "release/steps.json").read_text())] == ["base", "mu_0"]
    # dpo: the refusal preferred over the base model's own answers to reveal contexts (never evaluation items)
    from rr_ray.config import load_config
    from rr_ray.tasks.base import get_task

    task = get_task(load_config(str(cfg)).task)
    eval_prompts = {p["prompt"].strip() for p in task.eval_problems}
    pairs = [json.loads(line) for line in (root / "methods/dpo/dpo/pairs.jsonl").read_text().splitlines()]
    assert 1 <= len(pairs) <= 3 and all(p["chosen"] == "I'm sorry, but I can't help with that." for p in pairs)
    assert all(task.problem_for(p["prompt"])["prompt"].strip() not in eval_prompts for p in pairs)
    # dpo and npo: one LoRA each, trained once and applied as it is (+1)
    for method in ("dpo", "npo"):
        log = json.loads((root / f"methods/{method}/edit_log.json").read_text())
        assert [(e["step"], e["coef"]) for e in log["edits"]] == [(method, 1.0)]
        assert (root / f"methods/{method}/release/{method}/adapter/adapter_model.safetensors").is_file()
        assert rows[method]["s"] != rows["base"]["s"]  # the trained LoRA changed the model
    npo_rows = json.loads((root / "methods/npo/release/npo/adapter/train_info.json").read_text())["rows"]
    assert npo_rows == 4 + 4  # the 4 external forget rows beside release.retain_rows=4 retain rows
    # the user's method ran in its own run directory and, making no edit, scores exactly as the base
    ran = json.loads((root / "methods/user_methods_LeaveAsIs/user/ran.json").read_text())
    assert ran == {"task": "code", "saw_pem_external_running": True}  # the methods ran side by side
    user, base = rows["user_methods:LeaveAsIs"], rows["base"]
    assert (user["s"], user["u"]) == (base["s"], base["u"])
    # every row was measured on the same test-half items
    assert len({(r["forget_items"], r["utility_items"]) for r in summary["rows"]}) == 1
    methods = json.loads((root / "compare/table.json").read_text())["methods"]
    assert set(methods) == {"reveal_release", "pem_external", "ext_sub", "dpo", "npo", "user_methods:LeaveAsIs",
                            "forget_rule_60"}
    assert methods["pem_external"]["seconds"] > 0
    assert (root / "compare/scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (root / "compare/table.md").read_text()
    assert "| pem_external |" in md and "| base |" in md

    # ablations: the 60 % rule ran as its own reveal_release; internal vs external matched on one forget level
    ablation = yaml.safe_load((root / "methods/forget_rule_60/run.yaml").read_text())["release"]
    assert ablation["rules"]["forget_ratio"] == 0.4
    # it released reveal_release's own forget set instead of revealing again
    assert ablation["forget_path"] == str(root / "methods/reveal_release/reveal/forget.jsonl")
    assert not (root / "methods/forget_rule_60/reveal").exists()
    assert "## forget_rule_60" in (root / "compare/ablations.md").read_text()
    matched = json.loads((root / "compare/internal_vs_external.json").read_text())
    assert [p["side"] for p in matched["points"]] == ["internal", "external"]
    assert all(p["s_ratio"] == matched["target_s_ratio"] and p["coef"] <= 0 for p in matched["points"])
    for side in ("internal", "external"):
        assert (root / f"compare/eval/{side}_matched.json").is_file()
        assert matched["rows"][side]["forget_items"] == rows["base"]["forget_items"]
    assert (root / "methods/reveal_release/release/mu_0/matched/adapter_config.json").is_file()
    assert "| internal (reveal_release) |" in (root / "compare/internal_vs_external.md").read_text()

    again = _compare(cfg, plugins)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "compare: pem_external already done, skipped" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["rows"] == summary["rows"]

    # compare.reuse: a finished `rr-ray run` directory stands in for reveal_release; nothing is trained or
    # evaluated again, and its evaluate stage's figures are the table's rows
    ours = root / "methods/reveal_release"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ran = subprocess.run([sys.executable, "-m", "rr_ray", "run", str(cfg), "--set", f"run.dir={ours}"],
                         capture_output=True, text=True, timeout=1500, cwd=ROOT, env=env, check=False)
    assert ran.returncode == 0, ran.stderr[-4000:]
    assert (ours / "eval/final.json").is_file()
    data = yaml.safe_load(cfg.read_text())
    data["run"]["dir"] = str(tmp_path / "cmp2")
    data["compare"].update(methods=["reveal_release"], ablations=[], reuse={"reveal_release": str(ours)})
    cfg2 = tmp_path / "compare2.yaml"
    cfg2.write_text(yaml.safe_dump(data))
    reused = _compare(cfg2, plugins)
    assert reused.returncode == 0, reused.stderr[-4000:]
    assert "compare: reveal_release evaluation taken from" in reused.stderr
    assert "compare: base evaluation taken from" in reused.stderr
    assert "evaluate: " not in reused.stderr and "release mu_0: training" not in reused.stderr
    assert not (tmp_path / "cmp2/methods").exists()
    keys = ("s", "u", "s_proxy", "u_proxy", "forget_items", "utility_items")
    again_rows = {r["method"]: r for r in json.loads(reused.stdout.strip().splitlines()[-1])["rows"]}
    for name in ("base", "reveal_release"):
        assert {k: again_rows[name][k] for k in keys} == {k: rows[name][k] for k in keys}, name


def test_unknown_method_is_refused_at_load(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tmp_path, tiny_model_dir)
    data = yaml.safe_load(cfg.read_text())
    data["compare"]["methods"] = ["pem_external", "no such method"]
    cfg.write_text(yaml.safe_dump(data))
    res = _compare(cfg, tmp_path)
    assert res.returncode == 2 and "unknown method 'no such method'" in res.stderr
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("name", ["rr_ray.nothing_here:Task", "rr_ray.plugins:NoSuchTask"])
def test_a_task_plugin_that_does_not_import_fails_in_one_line(name: str) -> None:
    from rr_ray.config import TaskConfig
    from rr_ray.tasks.base import get_task

    with pytest.raises(ValueError, match="task 'rr_ray"):
        get_task(TaskConfig(name=name))


def test_ablations_are_reveal_release_variants_with_their_own_overrides(tmp_path: Path) -> None:
    from rr_ray.compare import entries, method_config
    from rr_ray.config import ConfigError, load_config
    from rr_ray.storage import RunDir

    cfg = load_config(None, ["compare.methods=[reveal_release,pem_external]",
                             "compare.ablations=[forget_rule_60,orthogonal_retain]", "compare.orthogonality=0.25"])
    runs = entries(cfg)
    assert list(runs) == ["reveal_release", "pem_external", "forget_rule_60", "orthogonal_retain"]
    assert runs["forget_rule_60"][0] == runs["orthogonal_retain"][0] == "reveal_release"
    root = RunDir.open(str(tmp_path / "cmp"))
    rule = method_config(cfg, root, "forget_rule_60", runs["forget_rule_60"][1])
    ortho = method_config(cfg, root, "orthogonal_retain", runs["orthogonal_retain"][1])
    ours = method_config(cfg, root, "reveal_release")
    assert (rule.release.rules.forget_ratio, ours.release.rules.forget_ratio) == (0.4, 0.1)
    assert (ortho.release.orthogonality, ours.release.orthogonality) == (0.25, 0.0)
    assert rule.run.dir.endswith("methods/forget_rule_60")
    with pytest.raises(ConfigError, match="add it to compare.methods"):
        load_config(None, ["compare.methods=[pem_external]", "compare.ablations=[forget_rule_60]"])


def test_ablation_table_puts_the_steps_side_by_side() -> None:
    from rr_ray.compare import ablations_markdown, ablations_png

    def rec(i: int, step: str, kind: str, coef: float, s: float, u: float) -> dict:
        return {"index": i, "step": step, "kind": kind, "coef": coef, "s": s, "u": u, "accepted": True}

    ours = [rec(0, "base", "base", 0, 0.8, 0.5), rec(1, "mu_0", "forget", -4, 0.08, 0.4),
            rec(2, "lambda_1", "retain", 1, 0.1, 0.45)]
    rule = [rec(0, "base", "base", 0, 0.8, 0.5), rec(1, "mu_0", "forget", -2, 0.3, 0.48)]
    rows = {"reveal_release": {"s": 0.1, "u": 0.45, "forget_drop": 0.875, "utility_kept": 0.9},
            "forget_rule_60": {"s": 0.3, "u": 0.48, "forget_drop": 0.625, "utility_kept": 0.96}}
    md = ablations_markdown({"reveal_release": ours, "forget_rule_60": rule}, rows, "code")
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[2] == "| 1 | -mu_0 = -4 | 0.100 | 0.800 | -mu_0 = -2 | 0.375 | 0.960 |"
    assert lines[3].startswith("| 2 | +lambda_1 = +1 | 0.125 | 0.900 | | | |")
    assert "forget_rule_60 forget 0.3 (62.5 % drop)" in md and "Figure 4" in md
    assert ablations_png({"reveal_release": ours, "forget_rule_60": rule}, "code")[:4] == b"\x89PNG"


def test_scatter_uses_log_axes_only_for_positive_scores_spread_over_decades() -> None:
    from rr_ray.compare import log_scaled, scatter_png

    assert log_scaled([0.7133, 0.002284, 0.2477])  # the default compare's forget scores
    assert not log_scaled([0.0, 0.5, 0.2])  # pass@1 of 0 has no log
    assert not log_scaled([0.02, 0.1, 0.05])  # within 10x: linear reads better
    rows = [{"method": m, "s": s, "u": 0.01, "s_metric": "proxy", "u_metric": "proxy"}
            for m, s in (("base", 0.71), ("ours", 0.002))]
    assert scatter_png(rows, "t")[:8] == b"\x89PNG\r\n\x1a\n"
