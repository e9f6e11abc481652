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
Among accepted candidates the smallest |coefficient| wins: the gentlest edit that meets the rule. When none is
accepted the best trade-off is returned with accepted=False, so the caller can log and decide.
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


def choose_forget(prev_s: float, prev_u: float, candidates: Sequence[Candidate], rules: RulesConfig) -> Decision:
    """mu_i: the accepted coefficient of smallest magnitude; else the largest (s drop - u drop), not accepted."""
    _require(candidates)
    accepted = [c for c in candidates if accept_forget(prev_s, prev_u, c.s, c.u, rules)]
    if accepted:
        c = _smallest(accepted)
        why = (f"s {c.s:.4g} <= {rules.forget_ratio:g} * {prev_s:.4g}" if c.s <= rules.forget_ratio * prev_s
               else _drops(prev_s, prev_u, c, rules))
        return Decision(c.coef, True, f"smallest |coef| accepted of {len(accepted)}/{len(candidates)}: {why}", c)
    scored = [c for c in candidates if _finite(c.s, c.u)] or list(candidates)
    c = max(scored, key=lambda c: (tradeoff_margin(prev_s, prev_u, c.s, c.u, rules) if _finite(c.s, c.u)
                                   else -math.inf, -abs(c.coef)))
    return Decision(c.coef, False, f"no candidate met the forget rule; best trade-off "
                                   f"({_drops(prev_s, prev_u, c, rules)}) reported, not accepted", c)


def choose_retain(prev_s: float, prev_u: float, candidates: Sequence[Candidate], rules: RulesConfig) -> Decision:
    """lambda_i: the accepted coefficient of smallest magnitude; else the one with the highest u, not accepted.

    prev_s is not part of the rule; it breaks ties between equal-u fallbacks (lower s preferred).
    """
    _require(candidates)
    accepted = [c for c in candidates if accept_retain(prev_u, c.u, rules)]
    if accepted:
        c = _smallest(accepted)
        return Decision(c.coef, True, (f"smallest |coef| accepted of {len(accepted)}/{len(candidates)}: "
                                       f"u {c.u:.4g} >= {rules.retain_ratio:g} * {prev_u:.4g}"), c)
    scored = [c for c in candidates if _finite(c.u)] or list(candidates)
    c = max(scored, key=lambda c: (c.u if _finite(c.u) else -math.inf,
                                   -(c.s - prev_s) if _finite(c.s) else -math.inf, -abs(c.coef)))
    return Decision(c.coef, False, (f"no candidate met the retain rule (u >= {rules.retain_ratio:g} * "
                                    f"{prev_u:.4g}); highest u {c.u:.4g} reported, not accepted"), c)
