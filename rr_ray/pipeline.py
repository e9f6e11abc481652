"""The driver: one process owns the flow of a run and writes its run directory.

Stages run in order: reveal (Alg. 1, forget set) -> release (eq. 1, edit log) -> evaluate (base vs final)
-> export -> report. Each is skipped when its done-marker exists and resumes its own finished steps
otherwise, so rerunning the same command continues a killed run and redoes no finished work.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from rich.console import Console

from rr_ray import cluster
from rr_ray.config import ConfigError, RRConfig, config_changes
from rr_ray.models.loader import describe_model, resolve_model
from rr_ray.storage import RunDir, localize
from rr_ray.tasks.base import SIDES

console = Console(stderr=True)


def open_run(cfg: RRConfig) -> RunDir:
    """Open the run directory and record the resolved config; refuse a directory of another config.

    Resource-only fields (``config.RESOURCE_FIELDS``: worker counts, CPUs/GPUs, batching) may change when a
    run resumes; run.yaml then records the new values and ``resumes.jsonl`` what changed. Any other change is
    refused, naming the field.
    """
    run = RunDir.open(cfg.run.dir, endpoint_url=cfg.run.s3_endpoint_url)
    resolved = cfg.to_yaml()
    if run.exists("run.yaml"):
        stored = run.read_text("run.yaml")
        if stored == resolved:
            return run
        refused, allowed = config_changes(stored, cfg)
        if refused:
            more = f" (+{len(refused) - 1} more)" if len(refused) > 1 else ""
            raise ConfigError(
                f"{run.uri}: holds a run with a different config ({refused[0]} differs{more}; see its run.yaml); "
                "only resource fields may change on resume: choose another run.dir or delete it"
            )
        if allowed:
            console.print(f"resuming with changed resources: {', '.join(allowed)}")
            rows = run.read_jsonl("resumes.jsonl") if run.exists("resumes.jsonl") else []
            run.write_jsonl("resumes.jsonl", rows + [{"time": time.time(), "changed": allowed}])
    run.write_text("run.yaml", resolved)
    return run


def _skipped(stage: str, info: dict[str, Any] | None) -> dict[str, Any] | None:
    """``info`` (the stage's done info, None if not done), saying the stage is skipped when it is done."""
    if info is not None:
        console.print(f"[dim]stage {stage}: already done, skipped[/dim]")
    return info


def stage_reveal(cfg: RRConfig, run: RunDir, model_dir: str) -> dict[str, Any]:
    """Algorithm 1 into ``reveal/`` (the forget set); skipped when a forget set is given by config."""
    from rr_ray.reveal.loop import run_reveal

    if cfg.release.forget_path:
        console.print(f"[dim]stage reveal: release.forget_path={cfg.release.forget_path} given, skipped[/dim]")
        return {"skipped": True, "forget_path": cfg.release.forget_path}
    if (info := _skipped("reveal", run.done_info("reveal"))) is not None:
        return info
    cluster.connect(cfg.ray)
    console.rule("[bold]reveal[/]: the model generates its own forget set (Algorithm 1)")
    info = run_reveal(cfg, run, model_dir)
    console.print(f"reveal: {info['forget_size']} forget rows, mean relevance {info['mean_relevance']:.3f}, "
                  f"Vendi {info['forget_vendi']:.2f} ({info['seconds']:.0f} s)")
    return info


def stage_release(cfg: RRConfig, run: RunDir) -> dict[str, Any]:
    """Equation 1 into ``release/`` and ``edit_log.json`` (each finished step is skipped on a rerun)."""
    from rr_ray.release.loop import run_release

    if (info := _skipped("release", run.done_info("release"))) is not None:
        return info | {"edit_log": run.read_json("edit_log.json")}
    cluster.connect(cfg.ray)
    console.rule("[bold]release[/]: forget and retain PEMs composed with swept weights (eq. 1)")
    return run_release(cfg, run, console)


def _evaluate_one(cfg_yaml: str, adapter_uri: str | None, side: str) -> dict[str, Any]:
    """One side (forget or utility) of one model's full metrics; a Ray task wherever Ray has room."""
    from rr_ray.config import config_from_text
    from rr_ray.evaluation.evaluate import evaluate

    cfg = config_from_text(cfg_yaml, "run.yaml")
    adapter = str(localize(adapter_uri, endpoint_url=cfg.run.s3_endpoint_url)) if adapter_uri else None
    # The scorer's model lands on the GPU Ray assigned to this task (generation.gpus_per_actor), through
    # loader.model_device(); with none assigned it stays on the CPU even on a GPU node.
    result = evaluate(cfg, adapter=adapter, limit=cfg.evaluate.limit, sides=(side,))
    return result | {"adapter": adapter_uri}


def evaluate_models(cfg: RRConfig, run: RunDir, models: dict[str, str | None],
                    prefix: str = "eval") -> dict[str, dict[str, Any]]:
    """Full metrics of each named model (base + adapter URI, None = base) into ``<prefix>/<name>.json``.

    Every part (model x forget/utility side) is its own Ray task, so they run in parallel where the cluster
    has room, and each is written as it finishes (``<prefix>/<name>.<side>.json``): a stopped run redoes at
    most the parts in flight.
    """
    resources = {"num_cpus": cfg.generation.cpus_per_actor, "num_gpus": cfg.generation.gpus_per_actor}
    task = ray.remote(**resources)(_evaluate_one)
    parts = {(name, side): f"{prefix}/{name}.{side}.json" for name in models for side in SIDES}
    pending = {}
    for (name, side), rel in parts.items():
        if not run.exists(f"{prefix}/{name}.json") and not run.exists(rel):
            console.print(f"evaluate: {name} model, {side} side ({cfg.task.name}, limit {cfg.evaluate.limit or 'all'})")
            pending[task.remote(cfg.to_yaml(), models[name], side)] = rel
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        run.write_json(pending.pop(ref), ray.get(ref))
    results = {}
    for name in models:
        if not run.exists(f"{prefix}/{name}.json"):
            halves = [run.read_json(parts[(name, side)]) for side in SIDES]
            merged = {**halves[0], **{side: h[side] for side, h in zip(SIDES, halves)},
                      "wall_s": round(sum(h["wall_s"] for h in halves), 2)}
            run.write_json(f"{prefix}/{name}.json", merged)
        results[name] = run.read_json(f"{prefix}/{name}.json")
    return results


def stage_evaluate(cfg: RRConfig, run: RunDir) -> dict[str, Any]:
    """Full task metrics (paper Tables 2-4) of the base and the final model -> eval/base.json, eval/final.json."""
    if (info := _skipped("evaluate", run.done_info("evaluate"))) is not None:
        return info
    cluster.connect(cfg.ray)
    console.rule("[bold]evaluate[/]: base vs unlearned model")
    t0 = time.perf_counter()
    results = evaluate_models(cfg, run, {"base": None, "final": run.done_info("release")["composed_adapter"]})
    from rr_ray.evaluation.evaluate import comparison_table

    console.print(comparison_table(results["base"], results["final"]))
    info = {"seconds": round(time.perf_counter() - t0, 1),
            "base": {"s": results["base"]["forget"]["s"], "u": results["base"]["utility"]["u"]},
            "final": {"s": results["final"]["forget"]["s"], "u": results["final"]["utility"]["u"]}}
    run.mark_done("evaluate", info)
    return info


def stage_export(cfg: RRConfig, run: RunDir) -> dict[str, Any]:
    from rr_ray.export import exported, write_export

    if (info := _skipped("export", exported(run))) is not None:
        return info
    console.rule("[bold]export[/]: merged model, adapter stack, composed LoRA")
    return write_export(run, cfg)


def stage_report(cfg: RRConfig, run: RunDir) -> dict[str, Any]:
    from rr_ray.report import write_report

    if (info := _skipped("report", run.done_info("report"))) is not None:
        return info
    uri = write_report(run, cfg)
    console.print(f"report: [bold]{uri}[/bold]")
    return run.done_info("report") or {"report": uri}


def run_pipeline(cfg: RRConfig) -> dict[str, Any]:
    """reveal -> release -> evaluate -> export -> report into ``cfg.run.dir`` (resumable at every stage)."""
    t0 = time.perf_counter()
    model_dir = str(resolve_model(cfg.model.name_or_path, cfg.model.cache_dir, cfg.run.s3_endpoint_url))
    m = describe_model(model_dir)
    console.print(f"loaded {cfg.model.name_or_path}: {m['architecture']}, {m['parameters'] / 1e6:.1f} M parameters, "
                  f"{m['layers']} layers, hidden {m['hidden']} ({model_dir})")
    run = open_run(cfg)
    address = cluster.connect(cfg.ray)
    summary: dict[str, Any] = {"model": cfg.model.name_or_path, "model_dir": model_dir, "run_dir": run.uri,
                               "ray": address, "stages_s": {}}
    stages = (("reveal", lambda: stage_reveal(cfg, run, model_dir)), ("release", lambda: stage_release(cfg, run)),
              ("evaluate", lambda: stage_evaluate(cfg, run)), ("export", lambda: stage_export(cfg, run)),
              ("report", lambda: stage_report(cfg, run)))
    for name, stage in stages:
        t = time.perf_counter()
        summary[name] = stage()
        summary["stages_s"][name] = round(time.perf_counter() - t, 1)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    run.write_json("timings.json", {"stages_s": summary["stages_s"], "wall_s": summary["wall_s"]})
    return summary
