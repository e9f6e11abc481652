"""The driver: one process owns the flow of a run and writes its run directory.

Stages run in order and each is skipped when its done-marker exists, so rerunning a command continues a
killed run. Today the pipeline holds the foundation stage (``generate``: the model answers the task's
contexts through the generator pool); reveal, release, evaluate and export join it as they land.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rr_ray import cluster
from rr_ray.config import ConfigError, RRConfig
from rr_ray.generation.base import Request, SamplingParams
from rr_ray.generation.pool import GeneratorPool
from rr_ray.models.loader import describe_model, resolve_model
from rr_ray.storage import RunDir
from rr_ray.tasks import reveal_contexts

console = Console(stderr=True)


def open_run(cfg: RRConfig) -> RunDir:
    """Open the run directory and record the resolved config; refuse a directory of another config."""
    run = RunDir.open(cfg.run.dir, endpoint_url=cfg.run.s3_endpoint_url)
    resolved = cfg.to_yaml()
    if run.exists("run.yaml"):
        if run.read_text("run.yaml") != resolved:
            raise ConfigError(
                f"{run.uri}: holds a run with a different config (see its run.yaml); "
                "choose another run.dir or delete it"
            )
    else:
        run.write_text("run.yaml", resolved)
    return run


def sampling_params(cfg: RRConfig) -> SamplingParams:
    g = cfg.generation
    return SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                          n=g.n, stop=tuple(g.stop), seed=cfg.run.seed)


def stage_generate(cfg: RRConfig, run: RunDir, model_dir: str) -> dict[str, Any]:
    """The task's contexts answered by the model through the generator pool -> generate/samples.jsonl."""
    if run.is_done("generate"):
        info = run.done_info("generate")
        console.print(f"[dim]stage generate: already done ({info['rows']} rows), skipped[/dim]")
        return info
    prompts = reveal_contexts(cfg.task, seed=cfg.run.seed)
    params = sampling_params(cfg)
    address = cluster.connect(cfg.ray)
    t0 = time.perf_counter()
    pool = GeneratorPool(cfg.generation, model_dir, seed=cfg.run.seed)
    startup = time.perf_counter() - t0
    total = len(prompts)
    with Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("generate", total=total)
        t1 = time.perf_counter()
        outs = pool.generate([Request(p) for p in prompts], params,
                             on_batch=lambda rows: bar.advance(task, rows))
        wall = time.perf_counter() - t1
    pool.shutdown()
    rows = [
        {"context_id": i, "sample": j, "prompt": prompts[i], "response": c.text,
         "num_tokens": c.num_tokens, "finish_reason": c.finish_reason}
        for i, group in enumerate(outs) for j, c in enumerate(group)
    ]
    tokens = sum(r["num_tokens"] for r in rows)
    info = {
        "rows": len(rows), "prompts": total, "new_tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2), "actor_startup_s": round(startup, 3),
        "actors": cfg.generation.num_actors, "backend": cfg.generation.backend, "ray": address,
        "sampling": asdict(params),
    }
    run.write_jsonl("generate/samples.jsonl", rows)
    run.write_json("generate/stats.json", info)
    run.mark_done("generate", info)
    return info


def stage_release(cfg: RRConfig, run: RunDir) -> dict[str, Any]:
    """Equation 1 into ``release/`` and ``edit_log.json`` (each finished step is skipped on a rerun)."""
    from rr_ray.release.loop import run_release

    if run.is_done("release"):
        info = run.done_info("release") or {}
        console.print(f"[dim]stage release: already done ({info.get('steps')} steps), skipped[/dim]")
        return info | {"edit_log": run.read_json("edit_log.json")}
    cluster.connect(cfg.ray)
    return run_release(cfg, run, console)


def run_pipeline(cfg: RRConfig) -> dict[str, Any]:
    """Every stage that exists, in order, into ``cfg.run.dir``."""
    t0 = time.perf_counter()
    model_dir = str(resolve_model(cfg.model.name_or_path, cfg.model.cache_dir, cfg.run.s3_endpoint_url))
    m = describe_model(model_dir)
    console.print(f"loaded {cfg.model.name_or_path}: {m['architecture']}, {m['parameters'] / 1e6:.1f} M parameters, "
                  f"{m['layers']} layers, hidden {m['hidden']} ({model_dir})")
    run = open_run(cfg)
    summary = {"model": cfg.model.name_or_path, "model_dir": model_dir, "run_dir": run.uri}
    summary["generate"] = stage_generate(cfg, run, model_dir)
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    return summary
