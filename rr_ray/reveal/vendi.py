"""Vendi score (Friedman & Dieng 2023), exact, of order q, plus an incremental form for Alg. 1 line 11.

With unit-norm embeddings X (n x d) and cosine similarity K = X X^T, the Vendi score is the Hill number of
order q of the eigenvalues of K / n. The nonzero eigenvalues of X X^T / n equal those of X^T X / n, so the
score of D_self-gen plus a new batch Y needs only the d x d Gram S = X^T X kept so far:
eigvalsh((S + Y^T Y) / (n + b)) costs O(b d^2 + d^3), whatever n is (DESIGN.md "Mechanics").
"""

from __future__ import annotations

import numpy as np


def hill_number(eigenvalues: np.ndarray, q: float = 1.0) -> float:
    """exp(Renyi entropy of order q) of a probability vector; q = 1 is Shannon, q = inf the min-entropy."""
    p = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    total = p.sum()
    if total <= 0:
        raise ValueError("Vendi score of an empty set is undefined")
    p = p[p > 1e-12 * total] / total  # numerical zeros carry no mass and would break log(0)
    if q == 1.0:
        return float(np.exp(-(p * np.log(p)).sum()))
    if np.isinf(q):
        return float(1.0 / p.max())
    return float((p**q).sum() ** (1.0 / (1.0 - q)))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array (items x dims), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def vendi_score(embeddings: np.ndarray, q: float = 1.0) -> float:
    """Exact Vendi score of n items from their embeddings (rows are normalised to unit norm first).

    Uses the n x n or the d x d eigenproblem, whichever is smaller; both have the same nonzero spectrum.
    """
    x = _unit_rows(embeddings)
    n, d = x.shape
    if n == 0:
        raise ValueError("Vendi score of an empty set is undefined")
    gram = x @ x.T if n <= d else x.T @ x
    return hill_number(np.linalg.eigvalsh(gram / n), q)


class VendiAccumulator:
    """The kept set D_self-gen as its d x d Gram S = X^T X and size n; scores D plus a batch in O(b d^2 + d^3)."""

    def __init__(self, dim: int, q: float = 1.0) -> None:
        self.q = q
        self.gram = np.zeros((dim, dim), dtype=np.float64)
        self.n = 0

    def score_with(self, batch: np.ndarray) -> float:
        """Vendi score of the kept items together with ``batch`` (b x d); the kept set is unchanged."""
        y = _unit_rows(batch)
        if self.n + len(y) == 0:
            raise ValueError("Vendi score of an empty set is undefined")
        return hill_number(np.linalg.eigvalsh((self.gram + y.T @ y) / (self.n + len(y))), self.q)

    def novelty(self, batch: np.ndarray) -> float:
        """Where ``batch``'s Vendi gain over D falls between the least and the most any b items can add, in [0, 1].

        gain = Vendi(D U Y) - Vendi(D). The most: b items orthogonal to D and to each other. The least: b copies
        of D's dominant direction (its top eigenvector), which concentrates the spectrum most. The gain is
        negative whenever Y lies near D's bulk (on-topic responses once D is spread out: clipping it at 0 left
        every candidate of a run's later steps at diversity 0), and Vendi(D U Y) / (n + b) flattens as n grows
        (at n = 100 a duplicate and a novel batch differ by ~0.01); this range does neither. An empty D counts
        as Vendi 0 with least gain 1 (b identical items), so the first batch gets (Vendi(Y) - 1) / (b - 1).
        """
        y = _unit_rows(batch)
        b = len(y)
        if b == 0:
            raise ValueError("novelty of an empty batch is undefined")
        # Vendi(D) cancels out of (gain - least gain) / (most gain - least gain): compare Vendi(D U Y) directly.
        if self.n:
            eig = np.linalg.eigvalsh(self.gram)  # ascending; sums to n (unit rows)
            hi = hill_number(np.concatenate([eig, np.ones(b)]) / (self.n + b), self.q)
            eig[-1] += b
            lo = hill_number(eig / (self.n + b), self.q)
        else:
            lo, hi = 1.0, float(b)
        got = self.score_with(y)
        return float(np.clip((got - lo) / (hi - lo), 0.0, 1.0)) if hi > lo else 0.0

    def add(self, batch: np.ndarray) -> None:
        """Keep ``batch``: S += Y^T Y, n += b."""
        y = _unit_rows(batch)
        self.gram += y.T @ y
        self.n += len(y)

    def score(self) -> float:
        """Vendi score of the kept set alone."""
        return hill_number(np.linalg.eigvalsh(self.gram / self.n), self.q)

    def state(self) -> dict:
        return {"gram": self.gram.copy(), "n": self.n, "q": self.q}

    @classmethod
    def from_state(cls, state: dict) -> VendiAccumulator:
        acc = cls(np.asarray(state["gram"]).shape[0], float(state["q"]))
        acc.gram, acc.n = np.array(state["gram"], dtype=np.float64), int(state["n"])
        return acc
