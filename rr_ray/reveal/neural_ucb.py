"""NeuralUCB (Zhou et al. 2020) over a fixed candidate set, as INSTINCT uses it for instruction search.

A small MLP f(x; theta) maps a candidate's feature vector (the LLM's last-token hidden state of the
candidate's decoding input) to its predicted score. The upper confidence bound of candidate x is

    UCB(x) = f(x; theta) + nu * sqrt(g(x)^T Z^-1 g(x) / lambda),   g(x) = d f(x; theta) / d theta,

with Z = lambda * I + sum over selected candidates of g g^T, kept diagonal (INSTINCT's approximation, so
Z costs one vector of the size of theta). Zhou et al. divide by the network width m inside the root; we
divide by lambda as DESIGN.md writes it: a constant factor that nu absorbs. The MLP is refitted on all
observations after each update, with lambda as the L2 pull towards the initial weights (Zhou et al., eq. 3.4).

Per-candidate gradients use torch.func (vmap over grad) in chunks, so memory is O(chunk x |theta|), not
O(candidates x |theta|): 1000 candidates of a 576-d feature fit in a few MB.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def _mlp(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


class NeuralUCB:
    """Bandit over ``features`` (N x F); ``select`` picks the top-B UCB arms that are not yet observed."""

    def __init__(self, features: np.ndarray | torch.Tensor, *, lam: float = 1.0, nu: float = 0.1,
                 hidden: int = 32, seed: int = 0, train_steps: int = 200, lr: float = 1e-2,
                 chunk: int = 256) -> None:
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"features must be a non-empty 2-d array (candidates x dims), got {tuple(x.shape)}")
        if lam <= 0 or nu < 0:
            raise ValueError(f"NeuralUCB needs lambda > 0 and nu >= 0, got lambda={lam}, nu={nu}")
        # Hidden states have a few huge dimensions; standardising keeps the MLP's inputs O(1).
        self.mean, self.std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        self.x = (x - self.mean) / self.std
        self.lam, self.nu, self.hidden, self.seed = lam, nu, hidden, seed
        self.train_steps, self.lr, self.chunk = train_steps, lr, chunk
        torch.manual_seed(seed)  # the initial weights theta_0 are a function of the seed only
        gen = torch.Generator().manual_seed(seed)
        self.net = _mlp(x.shape[1], hidden)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / max(p.shape[-1], 1)) ** 0.5)
        self.theta0 = {k: v.detach().clone() for k, v in self.net.named_parameters()}
        # Predict f(x; theta) - f(x; theta_0), so the untrained model predicts exactly 0 (Zhou et al. get the
        # same by a mirrored initialisation); the gradients, and so the bonus, are unchanged.
        with torch.no_grad():
            self.f0 = self.net(self.x).squeeze(1)
        self.z = torch.full((sum(p.numel() for p in self.net.parameters()),), float(lam))
        self.obs_idx: list[int] = []
        self.obs_y: list[float] = []

    # -- per-candidate gradients -------------------------------------------------------------------
    def _grads(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x), flattened g(x)) for the candidates ``idx`` in one vmap call."""
        params = {k: v.detach() for k, v in self.net.named_parameters()}

        def f(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.net, p, (x.unsqueeze(0),)).squeeze()

        x = self.x[idx]
        g = vmap(grad(f), in_dims=(None, 0))(params, x)
        flat = torch.cat([g[k].reshape(len(idx), -1) for k in params], dim=1)
        with torch.no_grad():
            fx = self.net(x).squeeze(1) - self.f0[idx]
        return fx, flat

    def ucb(self) -> torch.Tensor:
        """UCB of every candidate (N,), computed chunk by chunk."""
        out = torch.empty(len(self.x))
        for start in range(0, len(self.x), self.chunk):
            idx = torch.arange(start, min(start + self.chunk, len(self.x)))
            fx, g = self._grads(idx)
            bonus = torch.sqrt((g * g / self.z).sum(1) / self.lam)
            out[idx] = fx + self.nu * bonus
        return out

    def select(self, top_b: int = 1) -> list[int]:
        """Alg. 1 line 7 (batch form): the ``top_b`` highest-UCB candidates not observed yet."""
        scores = self.ucb()
        scores[torch.tensor(self.obs_idx, dtype=torch.long)] = -torch.inf
        free = len(self.x) - len(set(self.obs_idx))
        if free <= 0:
            raise ValueError("every candidate has been observed: raise reveal.num_candidates")
        # Stable ordering: ties go to the lower index, so selections are reproducible.
        order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
        return order[: min(top_b, free)]

    # -- updates -----------------------------------------------------------------------------------
    def observe(self, idx: list[int], scores: list[float], fit: bool = True) -> None:
        """Alg. 1 line 13: record scores, add the chosen arms' g g^T (diagonal) to Z, refit the MLP."""
        if len(idx) != len(scores):
            raise ValueError(f"{len(idx)} candidates but {len(scores)} scores")
        if not idx:
            return
        _, g = self._grads(torch.tensor(idx, dtype=torch.long))
        self.z += (g * g).sum(0)
        self.obs_idx.extend(int(i) for i in idx)
        self.obs_y.extend(float(s) for s in scores)
        if fit:
            self.fit()

    def fit(self) -> float:
        """Full-batch Adam on all observations: sum of squared errors + lambda * ||theta - theta_0||^2."""
        if not self.obs_idx:
            return 0.0
        x = self.x[torch.tensor(self.obs_idx, dtype=torch.long)]
        y = torch.tensor(self.obs_y, dtype=torch.float32)
        f0 = self.f0[torch.tensor(self.obs_idx, dtype=torch.long)]
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)  # fresh each fit: no hidden state to save
        loss = torch.tensor(0.0)
        for _ in range(self.train_steps):
            opt.zero_grad()
            pred = self.net(x).squeeze(1) - f0
            reg = sum(((p - self.theta0[k]) ** 2).sum() for k, p in self.net.named_parameters())
            loss = ((pred - y) ** 2).sum() + self.lam * reg
            loss.backward()
            opt.step()
        return float(loss.detach())

    def predict(self) -> torch.Tensor:
        with torch.no_grad():
            return self.net(self.x).squeeze(1) - self.f0

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; tensors and plain values only (torch.load weights_only works)."""
        return {"net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
                "theta0": {k: v.clone() for k, v in self.theta0.items()}, "z": self.z.clone(),
                "obs_idx": list(self.obs_idx), "obs_y": list(self.obs_y),
                "hparams": {"lam": self.lam, "nu": self.nu, "hidden": self.hidden, "seed": self.seed,
                            "train_steps": self.train_steps, "lr": self.lr, "chunk": self.chunk}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["hparams"]["hidden"] != self.hidden:
            raise ValueError(f"saved NeuralUCB has hidden={state['hparams']['hidden']}, this one {self.hidden}")
        self.net.load_state_dict(state["net"])
        self.theta0 = {k: v.clone() for k, v in state["theta0"].items()}
        self.z = state["z"].clone()
        self.obs_idx, self.obs_y = list(state["obs_idx"]), list(state["obs_y"])

    @classmethod
    def from_state(cls, features: np.ndarray | torch.Tensor, state: dict[str, Any]) -> NeuralUCB:
        bandit = cls(features, **state["hparams"])
        bandit.load_state_dict(state)
        return bandit
