"""NeuralUCB: finds high-value arms of a synthetic function faster than random; state round-trips."""

import io

import numpy as np
import torch

from rr_ray.reveal.neural_ucb import NeuralUCB


def _problem(n: int = 300, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 50, size=dim)  # badly scaled dimensions, like LLM hidden states
    x = rng.normal(size=(n, dim)) * scale
    w = rng.normal(size=dim) / scale
    y = 1 / (1 + np.exp(-2 * (x @ w) / np.sqrt(dim)))  # a smooth value in (0, 1), mean about 0.5
    return x, y


def test_learns_to_pick_high_value_candidates_better_than_random() -> None:
    x, y = _problem()
    bandit = NeuralUCB(x, lam=1.0, nu=0.1, seed=0, train_steps=100)
    picked = []
    for _ in range(10):
        idx = bandit.select(3)
        assert not set(idx) & set(bandit.obs_idx)  # never re-picks an observed arm
        bandit.observe(idx, [float(y[i]) for i in idx])
        picked.extend(idx)
    ucb_mean = y[picked[-15:]].mean()  # the later picks, after the model has seen some data
    rng = np.random.default_rng(1)
    random_means = [y[rng.choice(len(y), 15, replace=False)].mean() for _ in range(200)]
    assert ucb_mean > np.quantile(random_means, 0.95), (ucb_mean, np.mean(random_means))
    assert len(set(picked)) == len(picked) == 30


def test_save_load_round_trip_gives_identical_selections() -> None:
    x, y = _problem(seed=3)
    bandit = NeuralUCB(x, seed=5, train_steps=30)
    for _ in range(3):
        idx = bandit.select(2)
        bandit.observe(idx, [float(y[i]) for i in idx])
    buf = io.BytesIO()
    torch.save(bandit.state_dict(), buf)
    restored = NeuralUCB.from_state(x, torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert restored.select(4) == bandit.select(4)
    assert torch.equal(restored.ucb(), bandit.ucb())
    nxt = bandit.select(2)  # both continue identically
    for b in (bandit, restored):
        b.observe(nxt, [float(y[i]) for i in nxt])
    assert restored.select(3) == bandit.select(3)


def test_chunking_does_not_change_the_ucb() -> None:
    x, _ = _problem(n=50)
    a, b = NeuralUCB(x, seed=0, chunk=7), NeuralUCB(x, seed=0, chunk=256)
    assert torch.allclose(a.ucb(), b.ucb(), atol=1e-6)
