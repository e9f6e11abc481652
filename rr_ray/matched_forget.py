"""Internal vs external forget data at matched forget quality (paper section 4.2, Tables 5-6 shape).

reveal_release's first step (mu_0: one forget PEM on the model's own revealed data, swept over weights) and
pem_external (one forget PEM on the task's curated external data, swept the same way) differ only in the data.
Their weight sweeps on the validation halves are compared at the same forget level: the deepest s / s_base
both sweeps reach. Each side's weight for that level is interpolated linearly between the two sweep points
that bracket it; that edit is composed and evaluated on the test halves with the other models, so the
utility each keeps at equal forgetting is a measurement, not an interpolation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rr_ray.storage import RunDir

SIDES = {"internal": "reveal_release", "external": "pem_external"}  # side -> the method whose mu_0 it reads
STEP = "mu_0"


@dataclass(frozen=True)
class MatchedPoint:
    side: str
    coef: float  # the weight on the mu_0 PEM (negative: subtracted)
    s_ratio: float  # validation s / s_base at coef (the matched target)
    bracket: tuple[float, float]  # the two swept weights it lies between


def sweep_curve(run: RunDir) -> list[tuple[float, float]]:
    """(coef, s / s_base) of a method's mu_0 sweep on the validation halves, from weight 0 outwards."""
    base = run.read_json("release/base.json")
    trials = run.read_jsonl(f"release/{STEP}/trials.jsonl")
    points = sorted({(t["coef"], t["s"] / base["s"]) for t in trials}, key=lambda p: abs(p[0]))
    return [(0.0, 1.0), *points]


def common_target(curves: dict[str, list[tuple[float, float]]]) -> float:
    """The deepest forget level every sweep reaches: the largest of their smallest s / s_base."""
    return max(min(r for _, r in curve) for curve in curves.values())


def crossing(curve: list[tuple[float, float]], target: float, side: str) -> MatchedPoint:
    """The first weight, going outwards from 0, at which the sweep's s / s_base reaches ``target``; weight 0
    when the target is no forgetting at all (a sweep that never lowered s)."""
    if curve[0][1] <= target:
        return MatchedPoint(side, 0.0, target, (curve[0][0], curve[0][0]))
    for (c0, r0), (c1, r1) in zip(curve, curve[1:]):
        if r1 <= target:
            frac = (r0 - target) / (r0 - r1)  # r0 > target >= r1: the previous point had not reached it
            return MatchedPoint(side, round(c0 + frac * (c1 - c0), 4), target, (c0, c1))
    raise ValueError(f"{side}: its mu_0 sweep never reaches s / s_base = {target:.3f}")


def matched_points(runs: dict[str, RunDir]) -> tuple[float, list[MatchedPoint]]:
    """The common forget target and each side's weight for it; ``runs``: side -> the method's run dir."""
    curves = {side: sweep_curve(run) for side, run in runs.items()}
    target = common_target(curves)
    return target, [crossing(curves[side], target, side) for side in runs]


def to_json(target: float, points: list[MatchedPoint]) -> dict[str, Any]:
    return {"target_s_ratio": target, "points": [asdict(p) for p in points]}
