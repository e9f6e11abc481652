"""Reveal (Alg. 1) on the tiny random Llama: forget data with provenance, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rr_ray.config import load_config
from rr_ray.generation.pool import GeneratorPool
from rr_ray.pipeline import open_run
from rr_ray.reveal.loop import CHECKPOINT, run_reveal

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, model_dir: Path, run_dir: Path, **reveal) -> Path:
    data = {
        "run": {"dir": str(run_dir), "seed": 0},
        "model": {"name_or_path": str(model_dir)},
        "generation": {"num_actors": 1, "cpus_per_actor": 1, "batch_size": 8, "dtype": "float32"},
        "ray": {"num_cpus": 1},
        "task": {"name": "toxicity", "num_contexts": 4},
        "reveal": {"outer_iterations": 2, "inner_iterations": 2, "num_candidates": 8, "intrinsic_dim": 4,
                   "soft_tokens": 2, "exemplars": 1, "contexts_per_candidate": 2, "response_max_tokens": 8,
                   "max_instruction_tokens": 8, "decode_batch_size": 4, "warm_start_k": 2, **reveal},
    }
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _reveal(cfg_path: Path, model_dir: Path) -> tuple[dict, Path]:
    cfg = load_config(cfg_path)
    run = open_run(cfg)
    pool = GeneratorPool(cfg.generation, str(model_dir), seed=cfg.run.seed)
    try:
        info = run_reveal(cfg, run, str(model_dir), pool=pool, progress=False)
    finally:
        pool.shutdown()
    return info, Path(cfg.run.dir)


def test_reveal_writes_forget_data_with_provenance(tmp_path: Path, tiny_model_dir: Path, ray_local) -> None:
    info, run_dir = _reveal(_config(tmp_path, tiny_model_dir, tmp_path / "run"), tiny_model_dir)
    rows = [json.loads(line) for line in (run_dir / "reveal/forget.jsonl").read_text().splitlines()]
    best = json.loads((run_dir / "reveal/best_instructions.json").read_text())
    # m outer iterations x |C|, less the rows that repeat a kept (context, response) pair
    assert len(rows) == info["forget_size"] == sum(b["rows_added"] for b in best) == \
        2 * 4 - sum(b["duplicates_dropped"] for b in best)
    assert len({(r["context"], r["response"].strip()) for r in rows}) == len(rows)
    assert best[0]["rows_added"] == 4 and {r["outer"] for r in rows} <= {1, 2}
    for r in rows:
        assert set(r) == {"prompt", "response", "outer", "instruction", "context", "relevance"}
        assert r["context"] in r["prompt"] and r["prompt"].startswith(r["instruction"])
        assert 0.0 <= r["relevance"] <= 1.0
    assert [b["outer_iteration"] for b in best] == [1, 2]
    assert best[0]["instruction"] != best[1]["instruction"]  # a repeated P* is passed over
    assert [b["instruction"] for b in best] == info["best_instructions"]
    assert all(b["sentence"].startswith("The instruction was to") for b in best)
    steps = [json.loads(line) for line in (run_dir / "reveal/steps.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and len({s["cand"] for s in steps if s["outer"] == 0}) == 2
    assert all(0.0 <= s["score"] <= 1.0 and 0.0 <= s["v"] <= 1.0 for s in steps)
    # each inner step draws its own C_s (2 of the 4 contexts), reproducibly from the seed
    assert all(len(s["contexts"]) == 2 for s in steps) and len({tuple(s["contexts"]) for s in steps}) > 1
    # D_self-gen grows: the second outer loop scores against the first loop's f(C, P*).
    assert [s["kept"] for s in steps] == [0, 0, 4, 4]
    assert (run_dir / "reveal/progress.png").read_bytes()[:4] == b"\x89PNG"
    assert 1.0 <= info["forget_vendi"] <= len(rows)
    assert json.loads((run_dir / "_done/reveal.json").read_text())["forget_size"] == len(rows)
    # B = 2: two candidates per inner step, same bookkeeping.
    info2, run2 = _reveal(_config(tmp_path, tiny_model_dir, tmp_path / "run_b2", batch_candidates=2,
                                  outer_iterations=1), tiny_model_dir)
    steps2 = [json.loads(line) for line in (run2 / "reveal/steps.jsonl").read_text().splitlines()]
    assert len(steps2) == 4 and len({s["cand"] for s in steps2}) == 4
    assert info2["forget_size"] == 4


def test_direct_mode_answers_the_task_prompts(tmp_path: Path, tiny_model_dir: Path, ray_local) -> None:
    info, run_dir = _reveal(_config(tmp_path, tiny_model_dir, tmp_path / "direct", mode="direct"), tiny_model_dir)
    rows = [json.loads(line) for line in (run_dir / "reveal/forget.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["prompt"] == r["context"] and r["instruction"] == "" for r in rows)
    assert not (run_dir / "reveal/candidates").exists()  # no search, no decoding
    assert info["best_instructions"] == []


def test_killed_reveal_resumes_without_redoing_steps(tmp_path: Path, tiny_model_dir: Path, ray_local) -> None:
    killed_cfg = _config(tmp_path, tiny_model_dir, tmp_path / "killed")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "rr_ray", "reveal", str(killed_cfg)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ckpt = tmp_path / "killed" / CHECKPOINT
    deadline = time.monotonic() + 300  # 90 s was too short on a loaded 2-core machine
    try:
        while not ckpt.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    done_before = torch.load(ckpt, weights_only=True)
    steps_before = done_before["outer"] * 2 + done_before["inner"]
    assert 1 <= steps_before < 4 and not (tmp_path / "killed/_done/reveal.json").exists()

    resumed, killed_dir = _reveal(killed_cfg, tiny_model_dir)
    assert resumed["resumed_at_step"] == steps_before
    assert resumed["inner_steps_run"] == 4 - steps_before  # finished steps are never redone
    clean, clean_dir = _reveal(_config(tmp_path, tiny_model_dir, tmp_path / "clean"), tiny_model_dir)
    assert clean["inner_steps_run"] == 4
    for rel in ("reveal/forget.jsonl", "reveal/best_instructions.json", "reveal/steps.jsonl"):
        assert (killed_dir / rel).read_text() == (clean_dir / rel).read_text(), rel


def test_bad_run_of_other_config_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    from rr_ray.config import ConfigError

    cfg = load_config(_config(tmp_path, tiny_model_dir, tmp_path / "r"))
    open_run(cfg)
    other = cfg.model_copy(deep=True)
    other.reveal.alpha = 0.3
    with pytest.raises(ConfigError, match="different config"):
        open_run(other)


def test_compare_with_plain_scores_both_baselines(tmp_path: Path, tiny_model_dir: Path, ray_local) -> None:
    from rr_ray.reveal.compare import compare_with_plain

    cfg_path = _config(tmp_path, tiny_model_dir, tmp_path / "cmp")
    _reveal(cfg_path, tiny_model_dir)
    cfg = load_config(cfg_path)
    run = open_run(cfg)
    pool = GeneratorPool(cfg.generation, str(tiny_model_dir), seed=cfg.run.seed)
    try:
        result = compare_with_plain(cfg, run, pool)
    finally:
        pool.shutdown()
    run_dir = Path(cfg.run.dir)
    forget = [json.loads(line) for line in (run_dir / "reveal/forget.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (run_dir / "reveal/plain_responses.jsonl").read_text().splitlines()]
    n = len(forget)
    assert result["reveal"]["n"] == result["plain"]["n"] == result["plain_fresh"]["n"] == n
    # the controlled baseline answers exactly the forget rows' contexts, with no instruction
    assert [p["prompt"] for p in plain if p["baseline"] == "plain"] == [r["context"] for r in forget]
    assert result["plain"]["distinct_contexts"] == result["reveal"]["distinct_contexts"] == 4
    fresh = [p["prompt"] for p in plain if p["baseline"] == "plain_fresh"]
    assert len(fresh) == n and result["plain_fresh"]["distinct_contexts"] == len(set(fresh))
    for side in ("reveal", "plain", "plain_fresh"):
        assert 1.0 <= result[side]["vendi"] <= n and 0.0 <= result[side]["mean_relevance"] <= 1.0
    assert json.loads((run_dir / "reveal/compare_plain.json").read_text()) == result
