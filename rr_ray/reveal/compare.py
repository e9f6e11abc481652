"""Baselines for the reveal stage: the forget set vs as many responses to the plain task prompts.

Two baselines, both with the run's decoding settings and scored like the forget set (the task's relevance
oracle and the exact Vendi score of the responses):

- ``plain``: each forget row's own context, answered with no instruction. Same inputs, same count: the
  controlled comparison of what the instructions added (Algorithm 1 answers one fixed C in every outer loop,
  so a context appears once per outer iteration on both sides).
- ``plain_fresh``: as many *distinct* task contexts as there are forget rows (another seed than C where the
  task has enough). A harder baseline: it also gets more distinct inputs than the forget set had.
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

SIDES = {"reveal": "forget set (reveal)", "plain": "plain prompt, same contexts",
         "plain_fresh": "plain prompt, fresh contexts"}


def _stats(prompts: list[str], contexts: list[str], responses: list[str], task: Any, cfg: RRConfig
           ) -> dict[str, Any]:
    rel = [float(r) for r in task.relevance(prompts, responses)]
    return {"n": len(responses), "distinct_contexts": len(set(contexts)), "mean_relevance": float(np.mean(rel)),
            "vendi": vendi_score(embed(responses, cfg.reveal.embedder), cfg.reveal.vendi_q)}


def compare_with_plain(cfg: RRConfig, run: RunDir, pool: Any) -> dict[str, Any]:
    """Relevance and Vendi of reveal/forget.jsonl vs both plain baselines -> reveal/compare_plain.json."""
    from rr_ray.generation.base import Request

    forget = run.read_jsonl("reveal/forget.jsonl")
    if not forget:
        raise ValueError(f"{run.uri}: reveal/forget.jsonl is empty; run reveal first")
    task = get_task(cfg.task)
    same = [r["context"] for r in forget]
    fresh = task.contexts(len(forget), cfg.run.seed + 1)
    outs = pool.generate([Request(c) for c in same + fresh], reveal_params(cfg))
    texts = [o[0].text for o in outs]
    same_y, fresh_y = texts[: len(same)], texts[len(same):]
    result = {
        "reveal": _stats([r["prompt"] for r in forget], same, [r["response"] for r in forget], task, cfg),
        "plain": _stats(same, same, same_y, task, cfg),
        "plain_fresh": _stats(fresh, fresh, fresh_y, task, cfg),
        "task": cfg.task.name,
    }
    run.write_json("reveal/compare_plain.json", result)
    run.write_jsonl("reveal/plain_responses.jsonl",
                    [{"baseline": name, "prompt": c, "response": y}
                     for name, cs, ys in (("plain", same, same_y), ("plain_fresh", fresh, fresh_y))
                     for c, y in zip(cs, ys)])
    return result


def compare_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"reveal vs plain task prompt ({result['task']})")
    for col in ("", "responses", "distinct contexts", "mean relevance", "Vendi score"):
        table.add_column(col)
    for key, label in SIDES.items():
        if key in result:
            r = result[key]
            table.add_row(label, str(r["n"]), str(r.get("distinct_contexts", "")), f"{r['mean_relevance']:.4f}",
                          f"{r['vendi']:.3f}")
    return table
