"""Merge-weight selection of paper section 3.2 ("Merge Weight Selection").

s is the forget score (lower = more forgotten), u the utility score (higher = better), both positive; prev_*
are the scores at the beginning of the current step. The paper's rules:

  forget (mu_i):     s_i <= 0.1 * s_{i-1}   or   (s_{i-1} - s_i) > (u_{i-1} - u_i)
  retain (lambda_i): u_i >= 0.95 * u_{i-1}

with 0.1 / 0.95 = RulesConfig.forget_ratio / retain_ratio (forget_ratio 0.4 = the 60 % ablation, section 5.2).
The trade-off test subtracts a utility drop from a forget drop, which compares like with like only when s and u
share a unit (the paper's are both pass@1). ``tradeoff: relative`` (default) compares the fractional drops from
the start of the step, (s_{i-1} - s_i) / s_{i-1} > (u_{i-1} - u_i) / u_{i-1}, which is unit-free;
``tradeoff: absolute`` is the paper's formula as written, for tasks whose s and u are in one unit.
Which accepted candidate wins is a policy (``forget_policy`` / ``retain_policy``, documented on the functions);
the defaults pick the weights of the paper's Tables 7-9 given their rows. When none is accepted the best
trade-off is returned with accepted=False and the caller applies 0 or stops (``on_reject``), never that
candidate. ``refine_points`` proposes weights between grid points next to the choice (``refine_rounds``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rr_ray.config import RulesConfig


@dataclass(frozen=True)
class Candidate:
    """One scored coefficient: the model with this coef applied has forget score s and utility u."""

    coef: float
    s: float
    u: float


@dataclass(frozen=True)
class Decision:
    coef: float
    accepted: bool
    reason: str
    candidate: Candidate | None


def _finite(*xs: float) -> bool:
    return all(math.isfinite(x) for x in xs)


def tradeoff_margin(prev_s: float, prev_u: float, s: float, u: float, rules: RulesConfig) -> float:
    """Forget drop minus utility drop, fractional or absolute per ``rules.tradeoff``; > 0 passes the test."""
    if rules.tradeoff == "absolute":
        return (prev_s - s) - (prev_u - u)
    return (prev_s - s) / prev_s - (prev_u - u) / prev_u if prev_s > 0 and prev_u > 0 else -math.inf


def accept_forget(prev_s: float, prev_u: float, s: float, u: float, rules: RulesConfig) -> bool:
    """Forget rule: enough forgetting, or more forget score lost than utility lost."""
    if not _finite(prev_s, prev_u, s, u):
        return False
    return s <= rules.forget_ratio * prev_s or tradeoff_margin(prev_s, prev_u, s, u, rules) > 0


def accept_retain(prev_u: float, u: float, rules: RulesConfig) -> bool:
    """Retain rule: utility back to at least retain_ratio of its value at the start of the step."""
    return _finite(prev_u, u) and u >= rules.retain_ratio * prev_u


def _require(candidates: Sequence[Candidate]) -> None:
    if not candidates:
        raise ValueError("no candidates to choose a merge weight from")


def _drops(prev_s: float, prev_u: float, c: Candidate, rules: RulesConfig) -> str:
    if rules.tradeoff == "absolute":
        return f"forget drop {prev_s - c.s:.4g} vs utility drop {prev_u - c.u:.4g}"
    return (f"forget drop {(prev_s - c.s) / prev_s:.1%} vs utility drop {(prev_u - c.u) / prev_u:.1%}"
            if prev_s > 0 and prev_u > 0 else "previous scores not positive")


def _smallest(accepted: list[Candidate]) -> Candidate:
    return min(accepted, key=lambda c: (abs(c.coef), c.coef))


def meets_target(prev_s: float, s: float, rules: RulesConfig) -> bool:
    """The forget target of section 3.2: at least (1 - forget_ratio) of the step's forget score is gone."""
    return _finite(prev_s, s) and s <= rules.forget_ratio * prev_s


def choose_forget(prev_s: float, prev_u: float, candidates: Sequence[Candidate], rules: RulesConfig) -> Decision:
    """mu_i by ``rules.forget_policy``; when no candidate passes, the best trade-off, not accepted.

    target_first (default): the smallest |mu| that meets the forget target; if none does, the candidate with the
    largest trade-off margin among those passing the trade-off test. This reproduces the paper's picks: Table 9's
    mu_0 = 4 takes MBPP 0.659 -> 0.053 (the target), Table 8's mu_0 = 5 only passes the trade-off test.
    smallest_accepted: the smallest |mu| passing either test (a gentle edit that barely trades may win).
    """
    _require(candidates)
    accepted = [c for c in candidates if accept_forget(prev_s, prev_u, c.s, c.u, rules)]
    on_target = [c for c in accepted if meets_target(prev_s, c.s, rules)]
    if rules.forget_policy == "target_first" and on_target:
        c = _smallest(on_target)
        return Decision(c.coef, True, f"smallest |coef| meeting the forget target ({len(on_target)}/"
                                      f"{len(candidates)} do): s {c.s:.4g} <= {rules.forget_ratio:g} * {prev_s:.4g}", c)
    if rules.forget_policy == "target_first" and accepted:
        c = max(accepted, key=lambda c: (tradeoff_margin(prev_s, prev_u, c.s, c.u, rules), -abs(c.coef)))
        return Decision(c.coef, True, f"no candidate meets the forget target; best trade-off of the {len(accepted)} "
                                      f"passing: {_drops(prev_s, prev_u, c, rules)}", c)
    if accepted:
        c = _smallest(accepted)
        why = (f"s {c.s:.4g} <= {rules.forget_ratio:g} * {prev_s:.4g}" if meets_target(prev_s, c.s, rules)
               else _drops(prev_s, prev_u, c, rules))
        return Decision(c.coef, True, f"smallest |coef| accepted of {len(accepted)}/{len(candidates)}: {why}", c)
    scored = [c for c in candidates if _finite(c.s, c.u)] or list(candidates)
    c = max(scored, key=lambda c: (tradeoff_margin(prev_s, prev_u, c.s, c.u, rules) if _finite(c.s, c.u)
                                   else -math.inf, -abs(c.coef)))
    return Decision(c.coef, False, f"no candidate met the forget rule; best trade-off "
                                   f"({_drops(prev_s, prev_u, c, rules)}) was not applied", c)


def choose_retain(prev_s: float, ref_u: float, candidates: Sequence[Candidate], rules: RulesConfig) -> Decision:
    """lambda_i by ``rules.retain_policy`` among candidates with u >= retain_ratio * ref_u; when none passes, the
    highest u, not accepted.

    max_utility (default): the highest u among those accepted, i.e. "restore as much utility as possible" (Table
    9's lambda_1 = 1 lifts GSM8K 0.5959 -> 0.6823, judged against the step's start). smallest_accepted: the
    smallest |lambda| accepted. prev_s breaks ties between equal-u candidates (lower s preferred).
    """
    _require(candidates)
    accepted = [c for c in candidates if accept_retain(ref_u, c.u, rules)]
    if accepted:
        if rules.retain_policy == "max_utility":
            c = max(accepted, key=lambda c: (c.u, -c.s, -abs(c.coef)))
            how = "highest u"
        else:
            c, how = _smallest(accepted), "smallest |coef|"
        return Decision(c.coef, True, (f"{how} of the {len(accepted)}/{len(candidates)} accepted: "
                                       f"u {c.u:.4g} >= {rules.retain_ratio:g} * {ref_u:.4g}"), c)
    scored = [c for c in candidates if _finite(c.u)] or list(candidates)
    c = max(scored, key=lambda c: (c.u if _finite(c.u) else -math.inf,
                                   -(c.s - prev_s) if _finite(c.s) else -math.inf, -abs(c.coef)))
    return Decision(c.coef, False, (f"no candidate met the retain rule (u >= {rules.retain_ratio:g} * "
                                    f"{ref_u:.4g}); highest u {c.u:.4g} was not applied"), c)


def refine_points(kind: str, candidates: Sequence[Candidate], decision: Decision, prev_s: float,
                  rules: RulesConfig) -> list[float]:
    """Signed coefficients to score next so the rule can choose more finely than the grid.

    Forget: the midpoint between the chosen |mu| and the largest smaller |mu| on the grid (0 when none) when
    the chosen one meets the target (is a smaller weight enough?), or between it and the next larger one
    otherwise (does a little more reach the target?). Retain: the midpoints on both sides of the chosen lambda.
    Nothing when no candidate was accepted or the neighbours are too close to matter.
    """
    if not decision.accepted:
        return []
    sign = -1.0 if kind == "forget" else 1.0
    mags = sorted({abs(c.coef) for c in candidates} | {0.0})
    w = abs(decision.coef)
    below = max((m for m in mags if m < w), default=None)
    above = min((m for m in mags if m > w), default=None)
    if kind == "forget":
        hit = decision.candidate is not None and meets_target(prev_s, decision.candidate.s, rules)
        sides = [below] if hit else [above]
    else:
        sides = [below, above]
    points = [(w + m) / 2 for m in sides if m is not None and abs(w - m) > 0.05 * max(w, m)]
    return [sign * round(p, 6) for p in points if p > 0]
