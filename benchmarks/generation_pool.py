"""Pool-batched generation vs one prompt at a time through plain ``generate``, in one run.

Same model (the packaged default), same prompts, same token budget (EOS ignored so every completion is
exactly ``--max-new-tokens`` long). Prints tokens/s of each way, the ratio, and each against the matmul
roofline measured on this machine at the start of the run.

    .venv/bin/python benchmarks/generation_pool.py [--task toxicity|code] [--prompts 64] [--max-new-tokens 64] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rr_ray import cluster  # noqa: E402
from rr_ray.config import GenerationConfig, RayConfig, TaskConfig  # noqa: E402
from rr_ray.generation.base import Request, SamplingParams  # noqa: E402
from rr_ray.generation.pool import GeneratorPool  # noqa: E402
from rr_ray.models.loader import (apply_chat, describe_model, load_model, load_tokenizer,  # noqa: E402
                                  resolve_dtype, resolve_model)
from rr_ray.tasks import reveal_contexts  # noqa: E402


def matmul_gflops(dtype: torch.dtype, n: int = 1024, min_s: float = 0.5) -> float:
    """Measured square-matmul throughput (repeats until ``min_s`` has passed; one rep at least)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - t < min_s:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def one_at_a_time(model_dir: str, prompts: list[str], max_new_tokens: int) -> tuple[int, float]:
    """The plain way: fp32 model, one prompt per ``generate`` call."""
    tok, model = load_tokenizer(model_dir), load_model(model_dir, "float32")
    tokens, t = 0, time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            enc = tok(apply_chat(tok, p), return_tensors="pt", add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - enc["input_ids"].shape[1]
    return tokens, time.perf_counter() - t


def pooled(model_dir: str, prompts: list[str], max_new_tokens: int, cfg: GenerationConfig) -> tuple[int, float]:
    pool = GeneratorPool(cfg, model_dir)
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    pool.generate([Request(p) for p in prompts[: cfg.batch_size]], SamplingParams(max_new_tokens=4))  # warm-up
    t = time.perf_counter()
    out = pool.generate([Request(p) for p in prompts], params)
    wall = time.perf_counter() - t
    pool.shutdown()
    return sum(c.num_tokens for g in out for c in g), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--task", default="toxicity", choices=["toxicity", "code"],
                    help="whose contexts to use: toxicity prompts are short (decode-bound, like reveal's "
                         "instruction-following), code prompts are long HumanEval problems (prefill-bound)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    cpus = os.cpu_count() or 2
    torch.set_num_threads(cpus)
    model_dir = str(resolve_model("smollm2-135m-instruct"))
    params = describe_model(model_dir)["parameters"]
    flops_per_token = 2 * params  # one multiply-add per weight (tied lm_head counted once), attention ignored
    roof = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}
    prompts = reveal_contexts(TaskConfig(name=args.task, num_contexts=args.prompts))

    base_tokens, base_wall = one_at_a_time(model_dir, prompts, args.max_new_tokens)
    cluster.connect(RayConfig(num_cpus=cpus))
    dtype = resolve_dtype(args.dtype)
    cfg = GenerationConfig(num_actors=args.actors, cpus_per_actor=cpus / args.actors,
                           batch_size=args.batch_size, dtype=dtype)
    pool_tokens, pool_wall = pooled(model_dir, prompts, args.max_new_tokens, cfg)
    assert base_tokens == pool_tokens == args.prompts * args.max_new_tokens, (base_tokens, pool_tokens)

    base_tps, pool_tps = base_tokens / base_wall, pool_tokens / pool_wall
    result = {
        "task": args.task, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "cpus": cpus,
        "one_at_a_time": {"dtype": "float32", "tokens": base_tokens, "wall_s": round(base_wall, 2),
                          "tokens_per_s": round(base_tps, 1),
                          "roofline_pct": round(100 * base_tps * flops_per_token / 1e9 / roof["float32"], 1)},
        "pool": {"dtype": dtype, "actors": args.actors, "batch_size": args.batch_size, "tokens": pool_tokens,
                 "wall_s": round(pool_wall, 2), "tokens_per_s": round(pool_tps, 1),
                 "roofline_pct": round(100 * pool_tps * flops_per_token / 1e9 / roof[dtype], 1)},
        "ratio": round(pool_tps / base_tps, 2),
        "matmul_gflops": {k: round(v, 1) for k, v in roof.items()},
        "gflop_per_token": round(flops_per_token / 1e9, 3),
    }
    print(f"matmul roofline here: fp32 {roof['float32']:.0f} GFLOPS, bf16 {roof['bfloat16']:.0f} GFLOPS; "
          f"{flops_per_token / 1e9:.2f} GFLOP per token")
    for name in ("one_at_a_time", "pool"):
        r = result[name]
        print(f"{name:>14}: {r['tokens']} tokens in {r['wall_s']:.2f} s = {r['tokens_per_s']:.1f} tokens/s "
              f"({r['dtype']}, {r['roofline_pct']:.1f}% of its matmul roofline)")
    print(f"ratio pool / one-at-a-time: {result['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
