"""NeuralUCB select over N candidates: chunked torch.func (vmap of grad) vs a per-candidate backward loop.

    python benchmarks/neural_ucb_select.py [--candidates 1000] [--features 576]

Each method runs in its own fresh subprocess so its peak resident memory (ru_maxrss, minus the RSS
measured just before the call) is its own. Targets: chunked select <= 1 s and <= 200 MB extra.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _worker(method: str, n: int, f: int, hidden: int) -> None:
    import torch

    from rr_ray.reveal.neural_ucb import NeuralUCB

    x = np.random.default_rng(0).normal(size=(n, f)).astype(np.float32)
    bandit = NeuralUCB(x, hidden=hidden, seed=0, train_steps=50)
    bandit.observe([0, 1, 2, 3, 4], [0.1, 0.5, 0.2, 0.9, 0.4])
    bandit._grads(torch.arange(2))  # warm-up of torch.func on 2 rows, so the peak below is the call's own
    if method == "naive":
        def ucb() -> torch.Tensor:
            out = torch.empty(n)
            for i in range(n):
                bandit.net.zero_grad()
                fx = bandit.net(bandit.x[i : i + 1]).squeeze() - bandit.f0[i]
                fx.backward()
                g = torch.cat([p.grad.reshape(-1) for p in bandit.net.parameters()])
                out[i] = fx.detach() + bandit.nu * torch.sqrt((g * g / bandit.z).sum() / bandit.lam)
            return out
    else:
        ucb = bandit.ucb
    base = _rss_mb()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    scores = ucb()
    picked = int(torch.argmax(scores))
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "seconds": wall, "extra_peak_mb": max(peak - max(base, peak0), 0.0),
                      "params": int(bandit.z.numel()), "argmax": picked,
                      "ucb_head": [round(float(s), 6) for s in scores[:3]]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--features", type=int, default=576, help="hidden size of the LLM (SmolLM2-135M: 576)")
    ap.add_argument("--hidden", type=int, default=32, help="MLP width")
    ap.add_argument("--worker", choices=["chunked", "naive"])
    args = ap.parse_args()
    if args.worker:
        return _worker(args.worker, args.candidates, args.features, args.hidden)
    res = {}
    for method in ("chunked", "naive"):
        out = subprocess.run([sys.executable, __file__, "--worker", method, "--candidates", str(args.candidates),
                              "--features", str(args.features), "--hidden", str(args.hidden)],
                             capture_output=True, text=True, check=True)
        res[method] = json.loads(out.stdout.strip().splitlines()[-1])
    c, n = res["chunked"], res["naive"]
    assert c["argmax"] == n["argmax"] and np.allclose(c["ucb_head"], n["ucb_head"], atol=1e-4), res
    print(f"{args.candidates} candidates, {args.features}-d features, {c['params']} MLP parameters")
    for name, r in res.items():
        print(f"{name:8s}: {r['seconds']:7.3f} s, extra peak RSS {r['extra_peak_mb']:7.1f} MB")
    print(f"speed-up chunked vs naive: {n['seconds'] / c['seconds']:.1f}x")


if __name__ == "__main__":
    main()
