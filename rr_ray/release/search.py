"""Merge-weight search (paper section 3.2, "Merge Weight Selection"), done by hand in the paper and here as a
Ray Tune grid: every trial scores the current edit log plus the new PEM at one candidate coefficient.

A trial composes its candidate into one stacked LoRA (``pem.compose``) and scores it with the task's
continuous ``s`` and ``u`` on the evaluation subsets; the threshold rule (``rules.py``) then picks the
coefficient. Trials run in parallel on Ray's CPUs (or GPUs); their results are written into the run
directory, and a killed sweep resumes from Tune's experiment state (``Tuner.restore``).

With ``task.scoring_backend: vllm`` the K candidates are not K trials: one Ray task (one trial's GPUs, or on
CPU the CPUs of the K trials up to the cluster's) loads one vLLM engine and scores every candidate in one
engine call (a different composed adapter per request; ``Scorer.score_together``). A killed one is simply run
again.
"""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rr_ray.config import TaskConfig
from rr_ray.release.pem import Edit, EditLog, compose
from rr_ray.storage import arrow_storage, localize

_SCORERS: dict[tuple[str, str, str, int], Any] = {}  # per trial process: Tune reuses actors, the model stays loaded


@dataclass(frozen=True)
class SweepResult:
    trials: list[dict[str, Any]]  # one per coefficient, sorted by |coef|: {"coef", "s", "u", "seconds"}
    seconds: float
    restored: bool


def _scorer(model_dir: str, spec: dict[str, Any], threads: int) -> Any:
    from rr_ray.evaluation.scoring import Scorer

    key = (model_dir, spec["backend"], spec["dtype"], threads)
    if key not in _SCORERS:
        _SCORERS[key] = Scorer.from_spec(model_dir, spec, threads=threads)
    return _SCORERS[key]


def _s_and_u(task: Any, task_cfg: TaskConfig, adapter: str | None, limit: int | None,
             scorer: Any) -> dict[str, float]:
    from rr_ray.tasks.base import steering_scores

    # weights are chosen on the validation half; evaluation reports the test half
    forget, utility = steering_scores(task, task_cfg, scorer, adapter, limit, full=False, part="validation")
    return {"s": float(forget["s"]), "u": float(utility["u"])}


def score_edit_logs(logs: list[EditLog], *, model_dir: str, task_cfg: TaskConfig, limit: int | None,
                    spec: dict[str, Any], threads: int) -> list[dict[str, float]]:
    """``s`` and ``u`` of base + each log (each composed into one temporary stacked LoRA; adapters are local
    dirs), every row of every log scored in one backend call."""
    from rr_ray.tasks.base import get_task

    scorer = _scorer(model_dir, spec, threads)
    task = get_task(task_cfg)
    with ExitStack() as stack:
        adapters = []
        for log in logs:
            # A unique dir per candidate: the backends cache adapters by path.
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rr-ray-cand-"))
            adapter = compose(log, Path(tmp) / uuid.uuid4().hex)
            adapters.append(str(adapter) if adapter else None)
        jobs = [functools.partial(_s_and_u, task, task_cfg, a, limit) for a in adapters]
        if "exact" in (task_cfg.forget_metric, task_cfg.utility_metric):
            return [job(scorer) for job in jobs]  # exact metrics generate: no one-call likelihood batch
        return scorer.score_together(jobs)


def candidate_log(base: str, current: str | None, adapter: str, coef: float, kind: str, step: str) -> EditLog:
    """The current model (one composed LoRA, coefficient 1) plus the candidate PEM at ``coef``."""
    log = EditLog(base)
    if current:
        log = log.then(Edit(adapter=current, coef=1.0, kind="current"))
    return log.then(Edit(adapter=adapter, coef=coef, kind=kind, step=step)) if coef != 0.0 else log


def score_coefs(config: dict[str, Any], coefs: list[float]) -> list[dict[str, float]]:
    """``s`` and ``u`` of ``current + coef * adapter`` for each coefficient; resolves model and adapters here."""
    from rr_ray.models.loader import resolve_model

    t0 = time.perf_counter()
    endpoint = config.get("endpoint_url")
    model_dir = str(resolve_model(config["model"], config.get("cache_dir"), endpoint))
    current = str(localize(config["current"], endpoint_url=endpoint)) if config.get("current") else None
    adapter = str(localize(config["adapter"], endpoint_url=endpoint))
    logs = [candidate_log(config["model"], current, adapter, c, config["kind"], config["step"]) for c in coefs]
    scores = score_edit_logs(logs, model_dir=model_dir, task_cfg=TaskConfig.model_validate(config["task"]),
                             limit=config["limit"], spec=config["scorer"], threads=config["threads"])
    seconds = (time.perf_counter() - t0) / len(coefs)  # a shared call: each candidate's share of it
    return [{"coef": c, **sc, "seconds": seconds} for c, sc in zip(coefs, scores)]


def score_trial(config: dict[str, Any]) -> dict[str, float]:
    """Tune trainable: one candidate coefficient; returns its final metrics."""
    return score_coefs(config, [config["coef"]])[0]


def sweep(*, model: str, current: str | None, adapter: str, kind: str, step: str, coefs: list[float],
          task_cfg: TaskConfig, limit: int | None, storage_uri: str, name: str, scorer: dict[str, Any],
          cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0, endpoint_url: str | None = None,
          cache_dir: str | None = None, max_concurrent: int | None = None) -> SweepResult:
    """Score ``current + coef * adapter`` for every coefficient; Ray must be up.

    ``model`` is any reference ``resolve_model`` takes; ``current`` (the composed edit log so far, None = the
    base) and ``adapter`` are local dirs or s3:// URIs. ``coefs`` are signed (negative for a forget PEM);
    0.0 scores the current model itself. ``scorer`` is ``scorer_spec(cfg)``: hf runs parallel Tune trials,
    vllm one Ray task that scores all candidates in one engine call.
    """
    import ray
    from ray import tune

    t0 = time.perf_counter()
    space = {"model": model, "current": current, "adapter": adapter, "kind": kind, "step": step,
             "task": task_cfg.model_dump(), "limit": limit, "scorer": scorer, "threads": max(1, int(cpus_per_trial)),
             "endpoint_url": endpoint_url, "cache_dir": cache_dir}
    if scorer["backend"] == "vllm":
        # The one task stands in for the K trials: on CPU it may use the CPUs they would have (up to the cluster's).
        cpus = cpus_per_trial if gpus_per_trial else min(len(coefs) * cpus_per_trial,
                                                         max(cpus_per_trial, ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(score_coefs).options(num_cpus=cpus, num_gpus=gpus_per_trial, max_retries=2)
        trials = ray.get(task.remote(space, [float(c) for c in coefs]))
        trials.sort(key=lambda t: (abs(t["coef"]), t["coef"]))
        return SweepResult(trials=trials, seconds=time.perf_counter() - t0, restored=False)
    storage_path, fs = arrow_storage(storage_uri, endpoint_url)
    trainable = tune.with_resources(score_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    exp_path = f"{storage_path.rstrip('/')}/{name}"
    space["coef"] = tune.grid_search([float(c) for c in coefs])
    restored = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if restored:  # a killed sweep: finished trials are kept, unfinished and errored ones run again
        # The space goes along: trials the grid had not generated yet are made from it.
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, restart_errored=True,
                                   param_space=space, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=2)),
        )
    grid = tuner.fit()
    trials, errors = [], []
    for result in grid:
        if result.error is not None:
            errors.append(str(result.error).splitlines()[0])
        elif result.metrics and "s" in result.metrics:
            trials.append({k: float(result.metrics[k]) for k in ("coef", "s", "u", "seconds")})
    if errors and restored:
        # A sweep killed while Tune was creating a trial can leave it without its config; its results are
        # cheap to recompute, so an experiment that does not restore cleanly is started again.
        print(f"weight sweep {name}: restoring failed ({errors[0][:120]}); running it again", file=sys.stderr)
        if fs is None:
            shutil.rmtree(exp_path, ignore_errors=True)
        else:
            fs.delete_dir(exp_path)
        return sweep(model=model, current=current, adapter=adapter, kind=kind, step=step, coefs=coefs,
                     task_cfg=task_cfg, limit=limit, storage_uri=storage_uri, name=name, scorer=scorer,
                     cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, endpoint_url=endpoint_url,
                     cache_dir=cache_dir, max_concurrent=max_concurrent)
    if errors:
        raise RuntimeError(f"weight sweep {name}: {len(errors)} trial(s) failed: {errors[0]}")
    trials.sort(key=lambda t: (abs(t["coef"]), t["coef"]))
    return SweepResult(trials=trials, seconds=time.perf_counter() - t0, restored=restored)
