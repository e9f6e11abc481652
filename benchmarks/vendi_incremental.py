"""Vendi of D_self-gen plus a new batch: incremental d x d update vs the direct n x n eigenproblem.

    python benchmarks/vendi_incremental.py [--n 10000] [--d 384] [--b 8]

Both compute the same number (checked); the ratio is direct time / incremental time (target >= 1000x).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rr_ray.reveal.vendi import VendiAccumulator, hill_number


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="items already kept (D_self-gen)")
    ap.add_argument("--d", type=int, default=384, help="embedding dimension (MiniLM: 384)")
    ap.add_argument("--b", type=int, default=8, help="new items scored with the kept set")
    ap.add_argument("--repeats", type=int, default=20, help="incremental repetitions (timed as a mean)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    kept = rng.normal(size=(args.n, args.d))
    kept /= np.linalg.norm(kept, axis=1, keepdims=True)
    batch = rng.normal(size=(args.b, args.d))
    batch /= np.linalg.norm(batch, axis=1, keepdims=True)

    acc = VendiAccumulator(args.d)
    acc.add(kept)  # once per outer loop in Alg. 1, not per candidate
    t = time.perf_counter()
    for _ in range(args.repeats):
        inc = acc.score_with(batch)
    t_inc = (time.perf_counter() - t) / args.repeats

    t = time.perf_counter()
    x = np.vstack([kept, batch])
    direct = hill_number(np.linalg.eigvalsh(x @ x.T / len(x)))  # the textbook n x n form
    t_direct = time.perf_counter() - t

    assert abs(inc - direct) <= 1e-6 * direct, (inc, direct)
    print(f"n={args.n} d={args.d} b={args.b}: Vendi {inc:.4f} (both)")
    print(f"direct n x n eigvalsh : {t_direct:9.3f} s")
    print(f"incremental d x d     : {t_inc * 1e3:9.3f} ms")
    print(f"speed-up              : {t_direct / t_inc:9.0f}x")


if __name__ == "__main__":
    main()
