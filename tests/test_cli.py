"""The console script as a user runs it: --help everywhere, one-line errors with exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rr_ray.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def rr_ray(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rr_ray", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_on_every_subcommand(command: str | None, tmp_path: Path) -> None:
    res = rr_ray(*([command] if command else []), "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "usage: rr-ray" in res.stdout


@pytest.mark.parametrize(
    "args, yaml_text, needle",
    [
        (["--set", "foo=1", "run"], None, "foo: unknown key"),
        (["run", "--set", "generation.batch_size=x"], None, "generation.batch_size"),
        (["run", "bad.yaml"], "run: {dir: [1\n", "malformed YAML"),
        (["run", "missing.yaml"], None, "config file not found"),
        (["run", "--set", "model.name_or_path=nope"], None, "unknown model 'nope'"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, args: list[str],
                                                             yaml_text: str | None, needle: str) -> None:
    if yaml_text is not None:
        (tmp_path / "bad.yaml").write_text(yaml_text)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = rr_ray(*args, "--set", f"run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert res.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no run dir


def test_run_dir_of_another_config_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_text("something: else\n")
    res = rr_ray("run", "--set", f"run.dir={run}", "--set", f"model.name_or_path={tiny_model_dir}", cwd=tmp_path)
    assert res.returncode == 2
    assert "holds a run with a different config" in res.stderr
    assert sorted(p.name for p in run.iterdir()) == ["run.yaml"]
