"""``hf`` vs ``vllm`` generation through the generator pool, same prompts and token budget, in one run.

Both sides run the pipeline's own path: one ``GeneratorPool`` actor with all of Ray's CPUs over the chosen
backend, the packaged default model, the task's reveal contexts, greedy, EOS ignored so every completion is
exactly ``--max-new-tokens`` long, one warm-up batch first (engine load is timed separately). Prints tokens/s
of each, the ratio vllm / hf, and each against the matmul roofline measured at the start of the run; writes
``benchmarks/results/generation_backends.json``.

    .venv/bin/python benchmarks/generation_backends.py [--task toxicity|code] [--prompts 64] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks.* siblings

import torch  # noqa: E402

from benchmarks.generation_pool import matmul_gflops  # noqa: E402
from rr_ray import cluster  # noqa: E402
from rr_ray.config import GenerationConfig, RayConfig, TaskConfig  # noqa: E402
from rr_ray.generation.base import Request, SamplingParams  # noqa: E402
from rr_ray.generation.pool import GeneratorPool  # noqa: E402
from rr_ray.models.loader import DTYPES, describe_model, resolve_dtype, resolve_model  # noqa: E402
from rr_ray.tasks import reveal_contexts  # noqa: E402


def run_backend(backend: str, model_dir: str, prompts: list[str], max_new_tokens: int, dtype: str,
                cpus: int) -> dict:
    cfg = GenerationConfig(backend=backend, num_actors=1, cpus_per_actor=cpus, batch_size=len(prompts), dtype=dtype,
                           vllm_cpu_kvcache_gib=2)
    t = time.perf_counter()
    pool = GeneratorPool(cfg, model_dir)
    load = time.perf_counter() - t
    pool.generate([Request(p) for p in prompts[:4]], SamplingParams(max_new_tokens=4))  # warm-up
    t = time.perf_counter()
    out = pool.generate([Request(p) for p in prompts], SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
    wall = time.perf_counter() - t
    pool.shutdown()
    tokens = sum(c.num_tokens for g in out for c in g)
    return {"load_s": round(load, 1), "tokens": tokens, "wall_s": round(wall, 2), "tok_per_s": round(tokens / wall, 1),
            "texts": [g[0].text for g in out]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="toxicity", choices=["toxicity", "code"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default="benchmarks/results/generation_backends.json")
    args = ap.parse_args()

    model_dir = str(resolve_model("smollm2-135m-instruct"))
    info = describe_model(model_dir)
    dtype = resolve_dtype(args.dtype)
    prompts = reveal_contexts(TaskConfig(name=args.task, num_contexts=args.prompts))
    torch.set_num_threads(args.cpus)
    roof = matmul_gflops(DTYPES[dtype])
    cluster.connect(RayConfig(num_cpus=args.cpus))
    flops_per_token = 2 * info["parameters"]
    results = {}
    for backend in ("hf", "vllm"):
        r = run_backend(backend, model_dir, prompts, args.max_new_tokens, dtype, args.cpus)
        r["roofline_pct"] = round(100 * r["tok_per_s"] * flops_per_token / 1e9 / roof, 1)
        results[backend] = r
        print(f"{backend:>5}: {r['tokens']} tokens in {r['wall_s']} s = {r['tok_per_s']} tok/s "
              f"({r['roofline_pct']}% of the {roof:.0f} GFLOP/s {dtype} matmul roofline; load {r['load_s']} s)",
              flush=True)
    same = sum(a == b for a, b in zip(results["hf"].pop("texts"), results["vllm"].pop("texts")))
    ratio = results["vllm"]["tok_per_s"] / results["hf"]["tok_per_s"]
    print(f"vllm / hf = {ratio:.2f}x tokens/s; identical greedy texts {same}/{len(prompts)}")
    report = {"what": "generator-pool greedy decoding, EOS ignored, same prompts and token budget",
              "model": "smollm2-135m-instruct", "model_info": info, "task": args.task, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "dtype": dtype, "cpus": args.cpus,
              "matmul_roofline_gflops": round(roof, 1), "results": results, "vllm_over_hf": round(ratio, 3),
              "identical_texts": same}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
