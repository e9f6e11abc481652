"""Threshold rules of paper section 3.2 on hand-made score sequences (paper defaults and the 60 % ablation)."""

from __future__ import annotations

import math

import pytest

from rr_ray.config import RulesConfig, load_config
from rr_ray.release.rules import (
    Candidate,
    accept_forget,
    accept_retain,
    choose_forget,
    choose_retain,
    refine_points,
)

PAPER = RulesConfig()
GENTLE = RulesConfig(forget_policy="smallest_accepted", retain_policy="smallest_accepted")
SIXTY = RulesConfig(forget_ratio=0.4)  # section 5.2 ablation: forget only 60 % per iteration


def test_paper_defaults() -> None:
    assert (PAPER.forget_ratio, PAPER.retain_ratio) == (0.1, 0.95)


def test_accept_forget_either_condition() -> None:
    assert accept_forget(1.0, 0.8, 0.1, 0.2, PAPER)  # 90 % forgotten, even with a big utility loss
    assert not accept_forget(1.0, 1.0, 0.11, 0.0, PAPER)  # 0.11 > 0.1 and drop 0.89 < utility drop 1.0
    assert accept_forget(1.0, 0.8, 0.5, 0.7, PAPER)  # forget drop 0.5 > utility drop 0.1
    assert not accept_forget(1.0, 0.8, 0.5, 0.2, PAPER)  # drop 0.5 < utility drop 0.6, and 0.5 > 0.1
    assert not accept_forget(1.0, 0.8, 0.7, 0.5, PAPER)  # equal drops (0.3 vs 0.3): strict '>' fails
    assert not accept_forget(1.0, 0.8, math.nan, 0.8, PAPER)


def test_accept_retain_boundary() -> None:
    assert accept_retain(0.8, 0.76, PAPER)  # exactly 95 %
    assert not accept_retain(0.8, 0.7599, PAPER)
    assert accept_retain(0.8, 0.9, PAPER)
    assert not accept_retain(0.8, math.nan, PAPER)


def test_choose_forget_policies() -> None:
    # mu sweep on top of a model with s=1.0, u=0.8; coefs are signed (-mu)
    cands = [Candidate(-0.5, 0.9, 0.79), Candidate(-1.0, 0.6, 0.5), Candidate(-2.0, 0.3, 0.75),
             Candidate(-3.0, 0.08, 0.3), Candidate(-4.0, 0.05, 0.2)]
    gentle = choose_forget(1.0, 0.8, cands, GENTLE)
    # -0.5: drop 0.1 > 0.01 -> accepted by the trade-off rule; it is the smallest magnitude
    assert gentle.accepted and gentle.coef == -0.5 and gentle.candidate == cands[0]
    assert "utility drop" in gentle.reason
    # the default puts the 90 % target first: -3 is the smallest weight reaching s <= 0.1
    target = choose_forget(1.0, 0.8, cands, PAPER)
    assert target.accepted and target.coef == -3.0 and "forget target" in target.reason


def test_target_first_falls_back_to_the_best_tradeoff() -> None:
    cands = [Candidate(-1.0, 0.9, 0.79), Candidate(-2.0, 0.5, 0.7), Candidate(-3.0, 0.4, 0.3)]
    # margins (relative): 0.1-0.0125, 0.5-0.125, 0.6-0.625 (fails)
    d = choose_forget(1.0, 0.8, cands, PAPER)
    assert d.accepted and d.coef == -2.0 and "best trade-off" in d.reason


def test_paper_tables_weights_are_what_the_defaults_pick() -> None:
    """Each chosen row of Tables 7-9, among neighbours on a grid that bracket it, is what the defaults pick."""
    # Table 9 (code): MBPP pass@1 / GSM8K accuracy, same unit -> the paper's literal trade-off is fine too.
    mu0 = [Candidate(-2.0, 0.31, 0.70), Candidate(-3.0, 0.12, 0.65), Candidate(-4.0, 0.053, 0.5959),
           Candidate(-5.0, 0.02, 0.41)]
    assert choose_forget(0.659, 0.7437, mu0, PAPER).coef == -4.0
    # lambda_1 = +1 judged against the step start (0.5959), though below 0.95 x the base's 0.7437
    lam1 = [Candidate(0.3, 0.07, 0.62), Candidate(0.5, 0.08, 0.65), Candidate(1.0, 0.106, 0.6823),
            Candidate(2.0, 0.2, 0.66)]
    d = choose_retain(0.053, 0.5959, lam1, PAPER)
    assert d.accepted and d.coef == 1.0
    assert not choose_retain(0.053, 0.7437, lam1, PAPER).accepted  # the stricter before-forget reference
    mu1 = [Candidate(-0.2, 0.04, 0.67), Candidate(-0.4, 0.003, 0.6505), Candidate(-0.6, 0.0, 0.55)]
    assert choose_forget(0.106, 0.6823, mu1, PAPER).coef == -0.4
    # Table 8 (NER) mu_0 = -5: Person F1 0.537 -> 0.2474 misses the target; the trade-off test decides
    ner0 = [Candidate(-3.0, 0.45, 0.44), Candidate(-5.0, 0.2474, 0.2802), Candidate(-8.0, 0.2, 0.1)]
    assert choose_forget(0.537, 0.4636, ner0, RulesConfig(tradeoff="absolute")).coef == -5.0
    # Table 7 (toxicity) lambda_1 = +0.3: u = 1/PPL, 1/6.8652 is the highest of the grid
    tox = [Candidate(0.1, 0.4, 1 / 7.3), Candidate(0.3, 0.4689, 1 / 6.8652), Candidate(0.5, 0.5, 1 / 7.0)]
    assert choose_retain(0.3415, 1 / 7.8092, tox, PAPER).coef == 0.3


def test_refine_points_bracket_the_choice() -> None:
    cands = [Candidate(-2.0, 0.31, 0.70), Candidate(-4.0, 0.05, 0.59), Candidate(-8.0, 0.0, 0.3)]
    d = choose_forget(0.659, 0.7437, cands, PAPER)
    assert d.coef == -4.0 and refine_points("forget", cands, d, 0.659, PAPER) == [-3.0]  # is less enough?
    miss = [Candidate(-2.0, 0.5, 0.70), Candidate(-4.0, 0.3, 0.69)]  # trade-off only: does more reach it?
    d = choose_forget(0.659, 0.7437, miss, PAPER)
    assert d.accepted and d.coef == -4.0 and refine_points("forget", miss, d, 0.659, PAPER) == []  # no larger
    lam = [Candidate(0.5, 0.1, 0.6), Candidate(1.0, 0.1, 0.7), Candidate(2.0, 0.1, 0.65)]
    d = choose_retain(0.1, 0.6, lam, PAPER)
    assert refine_points("retain", lam, d, 0.1, PAPER) == [0.75, 1.5]
    rejected = choose_retain(0.1, 0.9, lam, PAPER)
    assert not rejected.accepted and refine_points("retain", lam, rejected, 0.1, PAPER) == []


def test_choose_forget_ratio_config_changes_choice() -> None:
    # every candidate loses more utility than forget score, so only the ratio condition can accept
    cands = [Candidate(-1.0, 0.7, 0.1), Candidate(-2.0, 0.35, 0.05), Candidate(-4.0, 0.09, 0.0)]
    paper = choose_forget(1.0, 1.0, cands, PAPER)
    sixty = choose_forget(1.0, 1.0, cands, SIXTY)
    assert paper.accepted and paper.coef == -4.0  # needs s <= 0.1
    assert sixty.accepted and sixty.coef == -2.0  # s <= 0.4 suffices
    assert "<= 0.4" in sixty.reason


def test_choose_forget_none_accepted_reports_best_tradeoff() -> None:
    cands = [Candidate(-1.0, 0.9, 0.5), Candidate(-2.0, 0.6, 0.1), Candidate(-3.0, 0.5, 0.0)]
    # trade-offs: 0.1-0.5=-0.4, 0.4-0.9=-0.5, 0.5-1.0=-0.5
    d = choose_forget(1.0, 1.0, cands, PAPER)
    assert not d.accepted and d.coef == -1.0
    assert "no candidate met the forget rule" in d.reason and "not applied" in d.reason


def test_choose_retain_policies() -> None:
    cands = [Candidate(0.1, 0.2, 0.70), Candidate(0.3, 0.25, 0.77), Candidate(0.5, 0.3, 0.79),
             Candidate(1.0, 0.5, 0.81)]
    d = choose_retain(0.2, 0.8, cands, GENTLE)
    assert d.accepted and d.coef == 0.3  # 0.77 >= 0.76: the gentlest that restores 95 %
    best = choose_retain(0.2, 0.8, cands, PAPER)
    assert best.accepted and best.coef == 1.0 and "highest u" in best.reason
    strict = choose_retain(0.2, 0.8, cands, RulesConfig(retain_ratio=1.0, retain_policy="smallest_accepted"))
    assert strict.accepted and strict.coef == 1.0


def test_choose_retain_none_accepted_reports_highest_utility() -> None:
    cands = [Candidate(0.1, 0.2, 0.5), Candidate(0.5, 0.3, 0.6), Candidate(1.0, 0.5, 0.55)]
    d = choose_retain(0.2, 0.8, cands, PAPER)
    assert not d.accepted and d.coef == 0.5
    assert "not applied" in d.reason


def test_nan_scores_never_win() -> None:
    cands = [Candidate(-1.0, math.nan, math.nan), Candidate(-2.0, 0.95, 0.2)]
    d = choose_forget(1.0, 1.0, cands, PAPER)
    assert not d.accepted and d.coef == -2.0
    assert choose_retain(0.2, 0.8, [Candidate(0.1, 0.1, math.nan), Candidate(0.2, 0.1, 0.1)], PAPER).coef == 0.2


def test_empty_candidates_rejected() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        choose_forget(1.0, 1.0, [], PAPER)


def test_sixty_percent_ablation_is_a_config_value(tmp_path) -> None:
    cfg = load_config(None, ["release.rules.forget_ratio=0.4"])
    assert cfg.release.rules.forget_ratio == 0.4
    assert accept_forget(1.0, 1.0, 0.4, 0.0, cfg.release.rules)
    assert not accept_forget(1.0, 1.0, 0.4, 0.0, PAPER)


def test_tradeoff_relative_is_unit_free_absolute_is_literal() -> None:
    # s and u on different scales (likelihoods of different data): u loses 20 % of itself, s 40 %
    prev_s, prev_u = 0.6, 0.01
    cand = [Candidate(-2.0, 0.36, 0.008)]
    rel = choose_forget(prev_s, prev_u, cand, PAPER)
    assert rel.accepted and "40.0%" in rel.reason and "20.0%" in rel.reason
    # rescaling u (a unit change) must not change the decision
    assert accept_forget(prev_s, prev_u * 100, 0.36, 0.8, PAPER)
    absolute = RulesConfig(tradeoff="absolute")
    assert accept_forget(prev_s, prev_u, 0.36, 0.008, absolute)  # 0.24 > 0.002
    assert not accept_forget(prev_s, prev_u * 1000, 0.36, 8.0, absolute)  # same change, u in other units
    # s loses 17 %, u 30 %: the literal differences (0.1 > 0.003) accept what the fractional test rejects
    assert accept_forget(prev_s, prev_u, 0.5, 0.007, absolute)
    assert not accept_forget(prev_s, prev_u, 0.5, 0.007, PAPER)
