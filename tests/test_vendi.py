"""Vendi score: the incremental d x d form equals the direct n x n eigenvalue computation."""

import numpy as np
import pytest

from rr_ray.reveal.vendi import VendiAccumulator, hill_number, vendi_score


def _direct(x: np.ndarray, q: float) -> float:
    """Textbook definition: eigenvalues of the n x n cosine-similarity matrix divided by n."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    lam = np.linalg.eigvalsh(x @ x.T / len(x))
    lam = lam[lam > 1e-12]
    if q == 1.0:
        return float(np.exp(-(lam * np.log(lam)).sum()))
    if np.isinf(q):
        return float(1 / lam.max())
    return float((lam**q).sum() ** (1 / (1 - q)))


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0, np.inf])
def test_incremental_equals_direct(q: float) -> None:
    rng = np.random.default_rng(0)
    kept, batch = rng.normal(size=(50, 16)), rng.normal(size=(5, 16))
    acc = VendiAccumulator(16, q)
    acc.add(kept[:30])
    acc.add(kept[30:])
    full = np.vstack([kept, batch])
    assert acc.score_with(batch) == pytest.approx(_direct(full, q), rel=1e-9)
    assert vendi_score(full, q) == pytest.approx(_direct(full, q), rel=1e-9)
    assert acc.score() == pytest.approx(_direct(kept, q), rel=1e-9)
    assert acc.n == 50  # score_with did not keep the batch
    restored = VendiAccumulator.from_state(acc.state())
    assert restored.score_with(batch) == acc.score_with(batch)


def test_small_n_uses_n_by_n_and_agrees() -> None:
    x = np.random.default_rng(1).normal(size=(4, 32))
    assert vendi_score(x, 1.0) == pytest.approx(_direct(x, 1.0), rel=1e-9)


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0, np.inf])
def test_known_cases(q: float) -> None:
    same = np.tile(np.random.default_rng(2).normal(size=(1, 8)), (6, 1))
    assert vendi_score(same, q) == pytest.approx(1.0, abs=1e-9)
    ortho = np.eye(8)[:5] * 3.0  # norms do not matter
    assert vendi_score(ortho, q) == pytest.approx(5.0, rel=1e-9)
    acc = VendiAccumulator(8, q)
    acc.add(ortho[:2])
    assert acc.score_with(ortho[2:]) == pytest.approx(5.0, rel=1e-9)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        hill_number(np.zeros(3))
    with pytest.raises(ValueError, match="2-d"):
        vendi_score(np.ones(3))


@pytest.mark.parametrize("q", [1.0, 2.0])
def test_novelty_still_discriminates_when_the_kept_set_is_large(q: float) -> None:
    """The old v = Vendi / (n + b) flattened: at n = 100 a duplicate and a novel batch differed by ~0.01."""
    rng = np.random.default_rng(3)
    dim = 64
    kept = rng.normal(size=(100, dim))
    kept[:, 48:] = 0.0  # D lives in the first 48 dimensions
    acc = VendiAccumulator(dim, q)
    acc.add(kept)
    duplicate = kept[:2].copy()
    novel = np.zeros((2, dim))
    novel[0, 50], novel[1, 60] = 1.0, 1.0  # orthogonal to D and to each other: the most any batch can add
    old = [acc.score_with(b) / (acc.n + 2) for b in (duplicate, novel)]
    assert abs(old[1] - old[0]) < 0.02
    assert acc.novelty(duplicate) < 0.5  # between the most concentrating batch (0) and the most novel (1)
    assert acc.novelty(novel) == pytest.approx(1.0, abs=1e-9)
    half = np.vstack([kept[:1], novel[:1]])  # one old item, one new one
    assert acc.novelty(duplicate) < acc.novelty(half) < acc.novelty(novel)
    assert acc.n == 100
    empty = VendiAccumulator(dim, q)
    assert empty.novelty(novel) == pytest.approx(1.0)
    assert empty.novelty(duplicate[:1].repeat(2, 0)) == pytest.approx(0.0)  # two identical items: the least


@pytest.mark.parametrize("q", [1.0, 2.0])
def test_novelty_ranks_batches_that_all_lower_the_vendi_score(q: float) -> None:
    """Once D is spread out, on-topic batches lower Vendi(D U Y); a clipped gain scored them all 0."""
    rng = np.random.default_rng(0)
    dim = 32
    a, b = np.eye(dim)[0], np.eye(dim)[1]

    def near(v: np.ndarray, k: int) -> np.ndarray:
        return v + 0.15 * rng.normal(size=(k, dim))

    acc = VendiAccumulator(dim, q)
    acc.add(np.vstack([near(a, 60), near(b, 20), rng.normal(size=(20, dim))]))  # D: mostly A, some B, some noise
    before = acc.score()
    batches = {"copies of A": np.vstack([a, a]), "near A": near(a, 2), "near B": near(b, 2)}
    gains = {k: acc.score_with(v) - before for k, v in batches.items()}
    assert gains["copies of A"] < 0 and gains["near A"] < 0  # a clipped gain would say 0 for both
    nov = {k: acc.novelty(v) for k, v in batches.items()}
    assert nov["copies of A"] < 0.05 < nov["near A"] < nov["near B"] < 1.0
