"""``rr-ray evaluate``: a task's forget and utility scores for one model (base + optional composed adapter)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.table import Table

from rr_ray.config import RRConfig
from rr_ray.evaluation.scoring import Scorer, scorer_spec
from rr_ray.models.loader import resolve_model
from rr_ray.storage import RunDir
from rr_ray.tasks.base import SIDES, get_task, steering_score


def evaluate(cfg: RRConfig, adapter: str | None = None, limit: int | None = None,
             scorer: Scorer | None = None, sides: tuple[str, ...] = SIDES) -> dict[str, Any]:
    """Forget and utility metrics of ``cfg.task`` for ``cfg.model`` (+ ``adapter``), ``limit`` items each.

    ``sides`` picks a part (e.g. only "utility"); the sides left out are absent from the result.
    """
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
    task = get_task(cfg.task)
    model_dir = str(resolve_model(cfg.model.name_or_path, cfg.model.cache_dir, cfg.run.s3_endpoint_url))
    scorer = scorer or Scorer.from_spec(model_dir, scorer_spec(cfg))
    t0 = time.perf_counter()
    scores = {side: steering_score(task, cfg.task, scorer, side, adapter, limit) for side in sides}
    t2 = time.perf_counter()
    return {"task": cfg.task.name, "model": cfg.model.name_or_path, "model_dir": model_dir,
            "adapter": adapter, "limit": limit, **scores, "wall_s": round(t2 - t0, 2)}


def metrics_table(result: dict[str, Any]) -> Table:
    """One row per metric: the forget side (s) first, then the utility side (u)."""
    title = f"{result['task']}: {result['model']}" + (f" + {result['adapter']}" if result["adapter"] else "")
    table = Table(title=title)
    for col in ("side", "metric", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for side in ("forget", "utility"):
        for key, value in result[side].items():
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            table.add_row(side, key, text)
    return table


def write_result(cfg: RRConfig, result: dict[str, Any]) -> str:
    """``eval/<task>.json`` in the run directory; returns its URI.

    The run's run.yaml is not required to match: evaluation only reads a model, so one run directory may
    collect the scores of several tasks and adapters; each file records what it measured.
    """
    run = RunDir.open(cfg.run.dir, endpoint_url=cfg.run.s3_endpoint_url)
    rel = f"eval/{cfg.task.name}.json"
    run.write_json(rel, result)
    return f"{run.uri.rstrip('/')}/{rel}"


def comparison_rows(base: dict[str, Any], final: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """(side, metric, base value, final value) for every metric both results report."""
    rows = []
    for side in ("forget", "utility"):
        for key, value in base[side].items():
            if key in final[side]:
                rows.append((side, key, value, final[side][key]))
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def comparison_table(base: dict[str, Any], final: dict[str, Any]) -> Table:
    """Base vs final model, one row per metric (the paper's Tables 2-4 columns as rows)."""
    table = Table(title=f"{base['task']}: base vs unlearned ({base['model']})")
    for col in ("side", "metric", "base", "unlearned", "change"):
        table.add_column(col, justify="left" if col in ("side", "metric") else "right")
    for side, key, b, f in comparison_rows(base, final):
        change = ""
        if isinstance(b, (int, float)) and isinstance(f, (int, float)) and not isinstance(b, bool):
            change = f"{100 * (f - b) / abs(b):+.1f} %" if b else f"{f - b:+.4g}"
        table.add_row(side, key, _fmt(b), _fmt(f), change)
    return table
