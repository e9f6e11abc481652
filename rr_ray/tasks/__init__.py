"""Unlearning targets. Each task supplies reveal contexts C (prompts only, never reference answers)."""

from __future__ import annotations

import random

from rr_ray.config import TaskConfig
from rr_ray.tasks import packaged_data

CODE_TEMPLATE = "Complete the following Python function. Reply with code only.\n\n```python\n{prompt}```"


def reveal_contexts(cfg: TaskConfig, seed: int = 0) -> list[str]:
    """``cfg.num_contexts`` prompts for the task, drawn reproducibly from its packaged data."""
    if cfg.name == "code":
        pool = [CODE_TEMPLATE.format(prompt=p["prompt"]) for p in packaged_data.humaneval()]
    elif cfg.name == "toxicity":
        pool = [row["text"] for row in packaged_data.toxicity_prompts()]
    else:
        raise NotImplementedError(f"task {cfg.name!r}: its contexts are not implemented yet (issue 4)")
    rng = random.Random(seed)
    return rng.sample(pool, min(cfg.num_contexts, len(pool)))
