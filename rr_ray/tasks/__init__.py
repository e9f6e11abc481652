"""Unlearning targets. Each task supplies reveal contexts C (prompts only, never reference answers).

The plugins live in their own modules behind :func:`rr_ray.tasks.base.get_task`; see ``base.Task``.
"""

from __future__ import annotations

from rr_ray.config import TaskConfig
from rr_ray.tasks.base import Task, get_task

__all__ = ["Task", "get_task", "reveal_contexts"]


def reveal_contexts(cfg: TaskConfig, seed: int = 0) -> list[str]:
    """``cfg.num_contexts`` prompts for the task, drawn reproducibly from its context pool."""
    return get_task(cfg).contexts(cfg.num_contexts, seed)
