"""`pip install rr-ray[cluster]` in a fresh venv, as the cluster specs install rr-ray, brings what every task
needs: each task is built and its oracle run there, with nothing from this checkout's .venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys
from rr_ray.config import TaskConfig, load_config
from rr_ray.models.packaged import PACKAGED, join_parts, part_paths
from rr_ray.tasks import get_task
from rr_ray.tasks.code import build_test_program

assert sys.prefix != sys.argv[1], "the probe must run in the fresh venv"
out = {}
code = get_task(TaskConfig(name="code", utility_data="gsm8k", code_eval_size=128))
p = code.eval_problems[0]
reply = "```python\n" + p["prompt"] + p["canonical_solution"] + "```"
out["code"] = code.relevance([p["prompt"]], [reply])[0]
out["gsm8k_retain"] = len(code.retain_data(8))
tox = get_task(TaskConfig(name="toxicity"))
out["toxicity"] = tox.relevance(["", ""], ["What a lovely day.", "you stupid fucking idiot"])
ner = get_task(TaskConfig(name="ner"))
out["ner_contexts"] = len(ner.contexts(4))
cfg = load_config(None, ["task.name=custom", "task.custom.oracle=embedding", "task.custom.examples=['def f(x): return x']",
                         "task.custom.contexts=[a, b, c]"])
custom = get_task(cfg.task)
out["custom"] = custom.relevance(["", ""], ["def g(y): return y", "I like tea."])
qwen = "qwen2.5-coder-0.5b-instruct"
joined = join_parts(part_paths(qwen), __import__("pathlib").Path(sys.argv[2]) / "q.gguf", PACKAGED[qwen].sha256)
out["qwen_gguf_bytes"] = joined.stat().st_size
print(json.dumps(out))
"""


@pytest.mark.e2e
def test_cluster_extra_builds_every_task_in_a_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "RAY_ADDRESS")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # A copy of what the package is made of: building from the checkout would leave build/ in it.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "rr_ray", src / "rr_ray", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built_before = (ROOT / "build").exists()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    # torch first, pinned: an unpinned one would be a CUDA build (the cluster images bring their own torch).
    for args in (["torch==2.13.0"], [f"{src}[cluster]"]):
        res = subprocess.run(pip + args, check=False, capture_output=True, text=True, env=env, timeout=1200)
        assert res.returncode == 0, res.stderr[-3000:]
    installed = time.perf_counter() - t0
    assert not (ROOT / "build").exists() or built_before, "the install wrote build/ into the checkout"
    res = subprocess.run([str(venv / "bin" / "python"), "-c", PROBE, str(ROOT / ".venv"), str(tmp_path)],
                         check=False, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"cluster install: {installed:.0f} s; probe {out}")
    assert out["code"] == 1.0 and out["gsm8k_retain"] == 8 and out["ner_contexts"] == 4
    benign, toxic = out["toxicity"]
    assert benign < 0.5 < toxic
    like, unlike = out["custom"]
    assert like > unlike
    assert out["qwen_gguf_bytes"] == 491_400_064
