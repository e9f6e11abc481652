"""Baseline for the reveal stage: the forget set vs as many responses to the plain task prompts.

The plain side answers ``len(forget)`` distinct task contexts (drawn with another seed than C where the task
has enough), with no instruction and the same decoding settings; both sides are scored with the task's
relevance oracle and the exact Vendi score of their responses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rr_ray.config import RRConfig
from rr_ray.reveal.loop import reveal_params
from rr_ray.reveal.scoring import embed
from rr_ray.reveal.vendi import vendi_score
from rr_ray.storage import RunDir
from rr_ray.tasks import get_task


def _stats(prompts: list[str], responses: list[str], task: Any, cfg: RRConfig) -> dict[str, Any]:
    rel = [float(r) for r in task.relevance(prompts, responses)]
    return {"n": len(responses), "mean_relevance": float(np.mean(rel)),
            "vendi": vendi_score(embed(responses, cfg.reveal.embedder), cfg.reveal.vendi_q)}


def compare_with_plain(cfg: RRConfig, run: RunDir, pool: Any) -> dict[str, Any]:
    """Relevance and Vendi of reveal/forget.jsonl vs plain-prompt responses -> reveal/compare_plain.json."""
    from rr_ray.generation.base import Request

    forget = run.read_jsonl("reveal/forget.jsonl")
    if not forget:
        raise ValueError(f"{run.uri}: reveal/forget.jsonl is empty; run reveal first")
    task = get_task(cfg.task)
    contexts = task.contexts(len(forget), cfg.run.seed + 1)
    outs = pool.generate([Request(c) for c in contexts], reveal_params(cfg))
    plain_responses = [o[0].text for o in outs]
    result = {
        "reveal": _stats([r["prompt"] for r in forget], [r["response"] for r in forget], task, cfg),
        "plain": _stats(contexts, plain_responses, task, cfg),
        "task": cfg.task.name,
    }
    run.write_json("reveal/compare_plain.json", result)
    run.write_jsonl("reveal/plain_responses.jsonl",
                    [{"prompt": c, "response": y} for c, y in zip(contexts, plain_responses)])
    return result


def compare_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"reveal vs plain task prompt ({result['task']})")
    for col in ("", "responses", "mean relevance", "Vendi score"):
        table.add_column(col)
    for name in ("reveal", "plain"):
        r = result[name]
        table.add_row(name, str(r["n"]), f"{r['mean_relevance']:.4f}", f"{r['vendi']:.3f}")
    return table
