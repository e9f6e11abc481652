"""Matching internal and external forget data at the same forget level (Tables 5-6 shape), on hand-made sweeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from rr_ray import matched_forget
from rr_ray.storage import RunDir


def _run(tmp_path: Path, name: str, trials: list[tuple[float, float]]) -> RunDir:
    run = RunDir.open(str(tmp_path / name))
    run.write_json("release/base.json", {"s": 2.0, "u": 1.0})
    run.write_jsonl("release/mu_0/trials.jsonl", [{"coef": c, "s": s, "u": 1.0} for c, s in trials])
    return run


def test_both_sides_are_matched_at_the_deepest_level_both_reach(tmp_path: Path) -> None:
    # internal reaches s / s_base 0.2, external only 0.5: the common target is 0.5
    internal = _run(tmp_path, "in", [(-4.0, 0.4), (-1.0, 1.6), (-2.0, 1.0)])
    external = _run(tmp_path, "ex", [(-1.0, 1.8), (-2.0, 1.4), (-4.0, 1.0)])
    target, points = matched_forget.matched_points({"internal": internal, "external": external})
    assert target == pytest.approx(0.5)
    by_side = {p.side: p for p in points}
    # internal: 0.5 lies between -1 (0.8) and -2 (0.5): exactly the swept -2
    assert by_side["internal"].coef == pytest.approx(-2.0) and by_side["internal"].bracket == (-1.0, -2.0)
    # external: only its last point reaches it
    assert by_side["external"].coef == pytest.approx(-4.0) and by_side["external"].bracket == (-2.0, -4.0)


def test_the_weight_is_interpolated_between_the_bracketing_sweep_points() -> None:
    curve = [(0.0, 1.0), (-1.0, 0.8), (-3.0, 0.4)]
    point = matched_forget.crossing(curve, 0.6, "internal")
    assert point.coef == pytest.approx(-2.0) and point.bracket == (-1.0, -3.0)
    # the first crossing going outwards counts, even when a larger weight undoes it
    bumpy = [(0.0, 1.0), (-1.0, 0.5), (-2.0, 0.9)]
    assert matched_forget.crossing(bumpy, 0.7, "external").coef == pytest.approx(-0.6)


def test_a_sweep_that_never_lowers_s_matches_both_at_no_edit() -> None:
    assert matched_forget.common_target({"a": [(0.0, 1.0), (-1.0, 1.3)], "b": [(0.0, 1.0), (-1.0, 0.4)]}) == 1.0
    assert matched_forget.crossing([(0.0, 1.0), (-1.0, 0.4)], 1.0, "b").coef == 0.0


def test_a_sweep_that_never_reaches_the_target_is_an_error() -> None:
    with pytest.raises(ValueError, match="external: its mu_0 sweep never reaches"):
        matched_forget.crossing([(0.0, 1.0), (-1.0, 0.9)], 0.5, "external")


def test_the_ablation_needs_pem_external_beside_reveal_release() -> None:
    from rr_ray.config import CompareConfig

    with pytest.raises(ValueError, match="add it to compare.methods"):
        CompareConfig(methods=["reveal_release"], ablations=["internal_vs_external"])
    cfg = CompareConfig(methods=["reveal_release", "pem_external"],
                        ablations=["internal_vs_external", "forget_rule_60"])
    assert cfg.variants() == ["forget_rule_60"]
