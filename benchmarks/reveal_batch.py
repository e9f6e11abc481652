"""Reveal batch mode: B = number of pool actors candidates per inner step vs B = 1 (the paper).

    python benchmarks/reveal_batch.py [--candidates 8] [--actors 2] [--model DIR]

Scores the same instructions through Alg. 1 lines 8-12 (pool responses, relevance, Vendi) one per step
and B per step, on a local Ray with one CPU per actor; prints wall time per scored candidate and the ratio.
Default model: a tiny random Llama built on the fly (the SmolLM2 tokenizer), so it finishes in minutes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--contexts", type=int, default=4, help="contexts_per_candidate")
    ap.add_argument("--tokens", type=int, default=32, help="response_max_tokens")
    ap.add_argument("--model", help="HF model dir (default: a tiny random Llama)")
    args = ap.parse_args()

    from rr_ray.cluster import connect
    from rr_ray.config import GenerationConfig, RayConfig, TaskConfig
    from rr_ray.generation.base import SamplingParams
    from rr_ray.generation.pool import GeneratorPool
    from rr_ray.reveal.scoring import CandidateScorer, embed
    from rr_ray.reveal.vendi import VendiAccumulator
    from rr_ray.tasks import get_task

    model_dir = args.model
    if model_dir is None:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the tiny-model builder
        from tests.conftest import build_tiny_llama

        model_dir = str(build_tiny_llama(Path(tempfile.mkdtemp(prefix="rr-bench-tiny-"))))
    connect(RayConfig(num_cpus=args.actors))
    gen = GenerationConfig(num_actors=args.actors, cpus_per_actor=1, batch_size=args.contexts, dtype="float32")
    pool = GeneratorPool(gen, model_dir)
    task = get_task(TaskConfig(name="toxicity"))
    contexts = task.contexts(args.contexts, 0)
    scorer = CandidateScorer(task, pool, SamplingParams(max_new_tokens=args.tokens), "all-MiniLM-L6-v2", 0.5)
    kept = VendiAccumulator(384)
    kept.add(embed(["warm-up"], "all-MiniLM-L6-v2"))
    instrs = [f"Answer in the style of writer number {i}." for i in range(args.candidates)]
    scorer.score(instrs[:1], contexts, kept)  # warm-up: actors, embedder, oracle
    result = {}
    for b in (1, args.actors):
        t = time.perf_counter()
        for s in range(0, len(instrs), b):
            scorer.score(instrs[s : s + b], contexts, kept)
        result[b] = (time.perf_counter() - t) / len(instrs)
    pool.shutdown()
    print(f"{args.candidates} candidates x {args.contexts} contexts, {args.tokens} tokens, {args.actors} actors")
    for b, sec in result.items():
        print(f"B = {b}: {sec:6.2f} s per scored candidate")
    print(f"speed-up B = {args.actors} vs B = 1: {result[1] / result[args.actors]:.2f}x")


if __name__ == "__main__":
    main()
