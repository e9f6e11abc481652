"""``rr-ray reveal CONFIG``: connect Ray, resolve the model, open the run, build a pool, run Algorithm 1."""

from __future__ import annotations

import json

from rr_ray.config import RRConfig


def reveal_command(cfg: RRConfig, compare_plain: bool = False) -> int:
    from rr_ray import cluster
    from rr_ray.generation.pool import GeneratorPool
    from rr_ray.models.loader import resolve_model
    from rr_ray.pipeline import console, open_run
    from rr_ray.reveal.compare import compare_table, compare_with_plain
    from rr_ray.reveal.loop import run_reveal

    model_dir = str(resolve_model(cfg.model.name_or_path, cfg.model.cache_dir, cfg.run.s3_endpoint_url))
    run = open_run(cfg)
    address = cluster.connect(cfg.ray)
    pool = GeneratorPool(cfg.generation, model_dir, seed=cfg.run.seed, model_ref=cfg.model.name_or_path)
    try:
        info = run_reveal(cfg, run, model_dir, pool=pool)
        console.print(f"reveal: {info['forget_size']} forget rows, mean relevance {info['mean_relevance']:.4f}, "
                      f"Vendi {info['forget_vendi']:.3f}, {info['seconds']} s")
        for k, instr in enumerate(info["best_instructions"], 1):
            console.print(f"  outer {k}: {instr!r}")
        if compare_plain:
            result = compare_with_plain(cfg, run, pool)
            console.print(compare_table(result))
            info = {**info, "compare_plain": result}
    finally:
        pool.shutdown()
    console.print(f"run directory: [bold]{run.uri}[/bold]")
    print(json.dumps({**info, "ray": address}))
    return 0
