"""Entry points for `ray job submit`: jobs/<task>_unlearn.py run the same pipeline as `rr-ray run`.

Inside a Ray job the supervisor sets RAY_ADDRESS to the cluster's GCS, so ``rr_ray.cluster.connect`` joins
the cluster the job was submitted to; the working dir (the uploaded repo) is the cwd and leads PYTHONPATH
on the driver and on every worker, so relative config paths and the uploaded ``rr_ray`` are what run.
"""

from __future__ import annotations

import argparse
import os
import sys

import rr_ray

DEFAULT_CONFIG = "configs/default.yaml"


def parse_job_args(task: str, argv: list[str] | None = None) -> list[str]:
    """Job arguments -> the equivalent `rr-ray run` argv (the job's task goes first, so --set can still win)."""
    parser = argparse.ArgumentParser(
        prog=f"jobs/{task}_unlearn.py",
        description=f"Reveal-and-Release unlearning of the {task!r} task on the Ray cluster this job runs on.")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"YAML config, relative to the job's working dir (default: {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted key, e.g. --set run.dir=s3://bucket/run")
    args = parser.parse_args(argv)
    argv_run = ["run", args.config, "--set", f"task.name={task}"]
    for item in args.overrides:
        argv_run += ["--set", item]
    return argv_run


def job_main(task: str, argv: list[str] | None = None) -> int:
    """Run the whole pipeline for ``task`` through `rr-ray run`; returns its exit code."""
    from rr_ray.cli import main

    argv_run = parse_job_args(task, argv)
    # Shows which copy of the package runs (the uploaded working dir vs. an installed one) and where.
    print(f"rr-ray job {task}: rr_ray from {os.path.dirname(rr_ray.__file__)}, "
          f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS', '(unset)')}, argv {argv_run}", file=sys.stderr, flush=True)
    return main(argv_run)
