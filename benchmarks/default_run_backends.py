"""The whole default run (``configs/default.yaml``) with each backend, one after the other, in one invocation.

Each side sets ``generation.backend`` (the Reveal pool's engine) to its name; ``task.scoring_backend`` (the
weight sweep's and evaluation's likelihood scoring) is ``--scoring`` for both (default hf: ``vllm_scoring.py``
measures vLLM-CPU scoring 4x slower than hf, so the whole run is compared on the generation backend; pass
``--scoring same`` to give each side its own name there too). Same config otherwise, each in a fresh run
directory under ``runs/bench-<side>`` (deleted first), run as the README's ``rr-ray run`` command. Prints each stage's wall time for both sides, the ratio
vllm / hf of the run's wall time, and the final s / u of each; writes
``benchmarks/results/default_run_backends.json``.

    .venv/bin/python benchmarks/default_run_backends.py [--sides hf,vllm] [--scoring hf|vllm|same]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_side(side: str, scoring: str) -> dict:
    run_dir = ROOT / "runs" / f"bench-{side}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "rr_ray", "run", str(ROOT / "configs" / "default.yaml"),
           "--set", f"run.dir={run_dir}", "--set", f"generation.backend={side}",
           "--set", f"task.scoring_backend={side if scoring == 'same' else scoring}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{side}: rr-ray run exited {proc.returncode}")
    timings = json.loads((run_dir / "timings.json").read_text())
    steps = json.loads((run_dir / "release" / "steps.json").read_text())
    return {"wall_s": round(wall, 1), "stages_s": timings["stages_s"], "run_wall_s": timings["wall_s"],
            "steps": [{k: r.get(k) for k in ("step", "coef", "s", "u")} for r in steps]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", default="hf,vllm")
    ap.add_argument("--scoring", default="hf", choices=["hf", "vllm", "same"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "default_run_backends.json"))
    args = ap.parse_args()
    results = {side: run_side(side, args.scoring) for side in args.sides.split(",")}
    stages = list(next(iter(results.values()))["stages_s"])
    print("stage".ljust(10) + "".join(s.rjust(10) for s in results))
    for stage in [*stages, "run_wall_s"]:
        vals = [r["stages_s"].get(stage) if stage != "run_wall_s" else r["run_wall_s"] for r in results.values()]
        print(stage.ljust(10) + "".join(f"{v:10.1f}" for v in vals))
    report = {"what": "rr-ray run configs/default.yaml, generation.backend per side", "scoring_backend": args.scoring,
              "results": results}
    if {"hf", "vllm"} <= set(results):
        report["vllm_over_hf_wall"] = round(results["vllm"]["run_wall_s"] / results["hf"]["run_wall_s"], 3)
        print(f"vllm / hf run wall time = {report['vllm_over_hf_wall']:.2f}x")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
