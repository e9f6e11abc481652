"""The Task protocol: everything the pipeline needs to know about an unlearning target, and nothing more.

A task supplies (DESIGN.md "Tasks are plugins"): reveal contexts C (prompts only, disjoint from the
evaluation sets), a relevance oracle in [0, 1], a forget score s and a utility score u of a model (base +
one composed adapter), retain data for the retain PEMs and, where it exists, external forget data for the
PEM-external baseline. ``forget_score`` returns a dict whose ``"s"`` is the scalar the threshold rules use;
``utility_score`` one whose ``"u"`` is. Every other key is a table column (paper Tables 2-4). With
``full=False`` a task may skip every metric that ``s``/``u`` do not need (the weight sweep scores many
candidates and reads only those two). ``part`` picks which half of the held-out items is scored: the
merge-weight sweep chooses on "validation", evaluation reports "test", so no reported figure is scored on
the items its weights were chosen on.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from rr_ray.config import TaskConfig

if TYPE_CHECKING:
    from rr_ray.evaluation.scoring import Scorer

T = TypeVar("T")
Part = Literal["test", "validation"]
SPLIT_SEED = 1234  # fixed: the context/eval split must not move with run.seed, or C could leak into eval


@runtime_checkable
class Task(Protocol):
    name: str

    def contexts(self, n: int, seed: int = 0) -> list[str]: ...

    def relevance(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...

    def forget_score(self, scorer: Scorer, adapter: str | None = None, limit: int | None = None,
                     full: bool = True, part: Part = "test") -> dict[str, Any]: ...

    def utility_score(self, scorer: Scorer, adapter: str | None = None, limit: int | None = None,
                      full: bool = True, part: Part = "test") -> dict[str, Any]: ...

    def retain_data(self, n: int) -> list[dict[str, str]]: ...

    def external_forget_data(self, n: int) -> list[dict[str, str]] | None: ...


def split(items: Sequence[T], n_eval: int, seed: int = SPLIT_SEED) -> tuple[list[T], list[T]]:
    """Deterministic (pool, eval) split: shuffle once with a fixed seed, the first ``n_eval`` are eval."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    return ([items[i] for i in order if i not in eval_idx], [items[i] for i in order[:n_eval]])


def unique(items: Sequence[T], key: Callable[[T], Any]) -> list[T]:
    """First occurrence of each key: the data sets repeat some items, which would leak across a split."""
    seen: set[Any] = set()
    out = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out


def sample(pool: Sequence[T], n: int, seed: int) -> list[T]:
    """``n`` items of ``pool`` drawn reproducibly (all of them when n >= len)."""
    return random.Random(seed).sample(list(pool), min(n, len(pool)))


def limited(items: Sequence[T], limit: int | None, part: Part = "test") -> list[T]:
    """The first ``limit`` items of one half of the held-out ``items``: "test" the even positions,
    "validation" the odd ones, so both halves keep the list's order (e.g. challenging prompts first); a
    single item serves both."""
    chosen = items[0::2] if part == "test" or len(items) < 2 else items[1::2]
    return list(chosen if limit is None else chosen[:limit])


# The task metric that "exact" steering puts in s / u (paper Tables 2-4), per task; absent = no such choice.
EXACT_METRICS: dict[str, dict[str, str]] = {
    "code": {"forget": "pass@1", "utility": "math_accuracy"},
    "ner": {"forget": "person_f1", "utility": "retain_types_mean_f1"},
}


SIDES = ("forget", "utility")


def exact_metric(cfg: TaskConfig, side: str) -> str | None:
    """The result key of the task's exact metric on ``side`` (forget / utility), or None if it has none.
    A plugin task (package.module:Class) names its own in an ``exact_metrics`` class attribute."""
    from rr_ray.plugins import TASKS, load

    names = EXACT_METRICS.get(cfg.name) or getattr(load("task", TASKS, cfg.name), "exact_metrics", None) or {}
    return names.get(side)


def steering_score(task: Task, cfg: TaskConfig, scorer: Scorer, side: str, adapter: str | None = None,
                   limit: int | None = None, full: bool = True, part: Part = "test") -> dict[str, Any]:
    """One side's result (``side``: forget or utility) with ``s`` / ``u`` set to the metric the config steers on.

    ``task.forget_metric`` / ``task.utility_metric``: ``proxy`` keeps the task's continuous score (a likelihood),
    ``exact`` puts the task's own metric (e.g. pass@1, GSM8K accuracy) in ``s`` / ``u`` and keeps the proxy as
    ``s_proxy`` / ``u_proxy``, so a full result always shows both.
    """
    key, metric, score = (("s", cfg.forget_metric, task.forget_score) if side == "forget"
                          else ("u", cfg.utility_metric, task.utility_score))
    use_exact = metric == "exact"
    exact = exact_metric(cfg, side)
    if use_exact and exact is None:
        raise ValueError(f"task.{side}_metric=exact: task {cfg.name!r} names no exact {side} metric")
    out = dict(score(scorer, adapter, limit, full=full or use_exact, part=part))
    if use_exact:
        out[f"{key}_proxy"], out[key] = out[key], float(out[exact])
    out[f"{key}_metric"] = exact if use_exact else "proxy"
    return out


def steering_scores(task: Task, cfg: TaskConfig, scorer: Scorer, adapter: str | None = None,
                    limit: int | None = None, full: bool = True,
                    part: Part = "test") -> tuple[dict[str, Any], dict[str, Any]]:
    """The forget and utility results of :func:`steering_score`."""
    forget, utility = (steering_score(task, cfg, scorer, side, adapter, limit, full, part) for side in SIDES)
    return forget, utility


def get_task(cfg: TaskConfig) -> Task:
    """The task plugin ``cfg.name`` names (a built-in or ``package.module:Class``), built from ``cfg``.

    Heavy task modules are imported only when chosen.
    """
    from rr_ray.plugins import TASKS, load

    return load("task", TASKS, cfg.name)(cfg)
