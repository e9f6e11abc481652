"""``rr-ray report``: every section present, numbers as in the JSON inputs, PNGs written, missing stages named."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from rr_ray.cli import main
from rr_ray.report import write_report
from rr_ray.storage import RunDir
from tests.conftest_s3 import s3_server, s3_uri  # noqa: F401
from tests.handmade_run import make_release_run

SECTIONS = ("# Reveal-and-Release report: code unlearning of", "## Base vs unlearned model",
            "## Release steps (equation 1)", "## Retain vs forget subspaces (section 4.1)",
            "## Best instructions (Reveal)", "## Forget set", "## Timings",
            "## Figures")


def _evaluation(adapter: str | None, s: float, u: float, n: int) -> dict:
    """The shape ``evaluate()`` returns for the code task (forget: code, utility: math)."""
    return {"task": "code", "model": "tiny", "model_dir": "/tmp/tiny", "adapter": adapter, "limit": 4,
            "forget": {"s": s, "solution_loglik": -3.0 * s, "code_problems": n},
            "utility": {"u": u, "math_answer_loglik": -2.0 * u, "math_problems": n},
            "wall_s": {"forget": 1.25, "utility": 2.5}}


def _add_reveal_and_eval(run: RunDir) -> tuple[dict, list[dict], list[dict]]:
    rows = [{"prompt": f"p{i}", "response": f"r{i}", "outer": 1 + i % 2, "instruction": f"I{1 + i % 2}",
             "context": f"c{i}", "relevance": 0.25 * (i % 4)} for i in range(6)]
    best = [{"outer_iteration": k, "instruction": f"write code for task {k}", "sentence": "x", "candidate": k,
             "score": 0.5 + 0.1 * k, "relevance": 0.6, "diversity": 0.4} for k in (1, 2)]
    info = {"mode": "search", "forget_size": len(rows), "mean_relevance": 0.375, "forget_vendi": 3.217,
            "scored_candidates": 8, "best_instructions": [b["instruction"] for b in best], "seconds": 123.4}
    run.write_jsonl("reveal/forget.jsonl", rows)
    run.write_json("reveal/best_instructions.json", best)
    run.write_bytes("reveal/progress.png", run.read_bytes("release/metrics.png"))
    run.mark_done("reveal", info)
    base, final = _evaluation(None, 0.8125, 0.5, 4), _evaluation("release/composed", 0.203, 0.4375, 4)
    run.write_json("eval/base.json", base)
    run.write_json("eval/final.json", final)
    run.mark_done("evaluate", {"wall_s": {"base": 3.75, "final": 4.0}})
    return info, best, [base, final]


@pytest.fixture(scope="module")
def _template(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("report-template") / "run"
    return root, make_release_run(tiny_model_dir, root)[1]


@pytest.fixture()
def release_run(_template: tuple[Path, object], tmp_path: Path) -> tuple[RunDir, object, Path]:
    """A fresh copy of the hand-made release run per test (the run's own files, markers and manifest)."""
    src, cfg = _template
    shutil.copytree(src, tmp_path / "run")
    return RunDir.open(str(tmp_path / "run")), cfg, tmp_path / "run"


def _figure_links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_report_of_a_release_only_run(release_run: tuple[RunDir, object, Path]) -> None:
    run, cfg, root = release_run
    uri = write_report(run, cfg)
    assert uri == f"{root}/report/report.md"
    md = run.read_text("report/report.md")
    for heading in SECTIONS:
        assert heading in md, heading
    assert "Evaluation not run (eval/base.json and eval/final.json missing)" in md
    assert "Reveal not run" in md  # both the instructions and the forget set
    assert md.count("Reveal not run") == 2
    assert run.read_text("release/steps.md").strip() in md  # Tables 7-9 verbatim
    links = _figure_links(md)
    assert links == ["release_steps.png"]
    assert run.read_bytes("report/release_steps.png") == run.read_bytes("release/metrics.png")
    assert "| reveal | not run |" in md and "| release | 42.5 |" in md
    assert run.is_done("report")


def test_report_numbers_match_the_inputs(release_run: tuple[RunDir, object, Path]) -> None:
    run, cfg, _ = release_run
    info, best, (base, final) = _add_reveal_and_eval(run)
    md = Path(write_report(run, cfg)).read_text()
    for heading in SECTIONS:
        assert heading in md, heading
    # Base vs final: each metric's two values and their change, as in eval/*.json.
    table = md.split("## Base vs unlearned model")[1].split("##")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ")}
    header = rows.pop("model")
    assert header == ["forget: s", "forget: solution_loglik", "forget: code_problems", "utility: u",
                      "utility: math_answer_loglik", "utility: math_problems"]
    for i, col in enumerate(header):
        side, key = col.split(": ")
        b, f = base[side][key], final[side][key]
        assert rows["Base model"][i] == (f"{b:.4g}" if isinstance(b, float) else str(b))
        assert rows["Unlearned (final)"][i] == (f"{f:.4g}" if isinstance(f, float) else str(f))
        assert rows["change"][i].startswith(f"{f - b:+.4g}" if f != b else "0")
    assert "(-75.0 %)" in rows["change"][0]  # 0.8125 -> 0.203
    # Per step: weight, train losses, train and sweep seconds from release/steps.json.
    for rec in run.read_json("release/steps.json")[1:]:
        losses = " → ".join(f"{x:.4f}" for x in rec["train"]["losses"])
        assert (f"| {rec['index']} | " in md and losses in md
                and f"| {rec['seconds']['train']:.4g} | {rec['seconds']['sweep']:.4g} |" in md)
    for b in best:
        assert f"- Outer iteration {b['outer_iteration']}: {b['instruction']} (score {b['score']:.3f}" in md
    assert f"| {info['forget_size']} | {info['mean_relevance']:.4g} | {info['forget_vendi']:.4g} |" in md
    forget = run.read_jsonl("reveal/forget.jsonl")
    for outer in (1, 2):
        rel = [r["relevance"] for r in forget if r["outer"] == outer]
        assert f"| {outer} | {len(rel)} | {sum(rel) / len(rel):.4g} |" in md
    assert "| reveal | 123.4 |" in md and "| evaluate | 7.75 |" in md  # evaluate: sum of its parts
    assert "| export | not run |" in md and "release-mu_0-train | 10 |" in md
    assert md.index("release-mu_0-train") < md.index("release-lambda_1-train")  # eq. 1's order
    links = _figure_links(md)
    assert set(links) == {"eval_base_vs_final.png", "release_steps.png", "reveal_progress.png"}
    for name in links:
        assert run.read_bytes(f"report/{name}")[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_report_rewrites(release_run: tuple[RunDir, object, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run, _, root = release_run
    assert main(["report", str(root)]) == 0
    first = run.read_text("report/report.md")
    assert "Evaluation not run" in first
    _add_reveal_and_eval(run)
    assert main(["report", str(root)]) == 0  # always rewritten: the new inputs show up
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["report"] == f"{root}/report/report.md"
    assert "Evaluation not run" not in run.read_text("report/report.md")


def test_report_of_an_s3_run(release_run: tuple[RunDir, object, Path], s3_server: str,  # noqa: F811
                             s3_uri: str) -> None:  # noqa: F811
    local, cfg, root = release_run
    remote = RunDir.open(s3_uri, endpoint_url=s3_server)
    remote.upload_dir(root / "release", "release")
    for name in ("release", "release-mu_0-train", "release-lambda_1-train"):
        remote.mark_done(name, local.done_info(name) or {})
    assert write_report(remote, cfg) == f"{s3_uri}/report/report.md"
    md = remote.read_text("report/report.md")
    assert local.read_text("release/steps.md").strip() in md and "| release | 42.5 |" in md
    assert md.index("release-mu_0-train | 10 |") < md.index("release-lambda_1-train | 20 |")
    # Table 1 from the adapters fetched off S3: the modules both PEMs target (v_proj in each of the 2 layers)
    assert re.search(r"\| lambda_1 \| mu_0 \| 2 \| 0\.\d{4} \| 0\.\d{4} \| 0\.\d{4} \|", md), md
    assert remote.read_bytes("report/release_steps.png")[:4] == b"\x89PNG" and remote.is_done("report")
