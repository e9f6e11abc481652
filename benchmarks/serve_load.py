"""Load test of the OpenAI-compatible server: C concurrent clients for D seconds; every error is counted.

Each client loops: one chat completion (greedy, ``--max-tokens`` new tokens), alternating between the
unlearned and the base model name, a share of them streamed. Prints latency percentiles (request sent to
last token received) and requests/s, and writes them to benchmarks/results/serve_load.json.

    .venv/bin/python benchmarks/serve_load.py [--clients 50] [--duration 20] [--max-tokens 16]
        [--url http://127.0.0.1:8000/v1 --name rr-ray]     # an already running server
        [--model smollm2-135m-instruct] [--adapter DIR]    # else: start Serve here (random LoRA if no adapter)
        [--max-batch-size 16] [--num-cpus 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

PROMPTS = ["Write a haiku about rivers.", "What is 17 times 3?", "Name three colours.",
           "Explain recursion in one sentence.", "Give me a word that rhymes with cat."]


async def _client(client: Any, models: list[str], k: int, deadline: float, max_tokens: int, stream_every: int,
                  out: dict[str, list]) -> None:
    i = 0
    while time.perf_counter() < deadline:
        model, prompt = models[(k + i) % len(models)], PROMPTS[(k + i) % len(PROMPTS)]
        stream = stream_every > 0 and (k + i) % stream_every == 0
        i += 1
        t = time.perf_counter()
        try:
            kwargs = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                          temperature=0)
            if stream:
                finish = None
                async for chunk in await client.chat.completions.create(stream=True, **kwargs):
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
            else:
                finish = (await client.chat.completions.create(**kwargs)).choices[0].finish_reason
            if finish not in ("stop", "length"):
                raise RuntimeError(f"no finish_reason (got {finish!r})")
            out["latency"].append(time.perf_counter() - t)
        except Exception as exc:  # every failure counts; the first few are reported verbatim
            out["errors"].append(f"{type(exc).__name__}: {exc}"[:300])


async def _run(base_url: str, models: list[str], clients: int, duration_s: float, max_tokens: int,
               stream_every: int) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    out: dict[str, list] = {"latency": [], "errors": []}
    start = time.perf_counter()
    await asyncio.gather(*(_client(client, models, k, start + duration_s, max_tokens, stream_every, out)
                           for k in range(clients)))
    wall = time.perf_counter() - start  # until the last in-flight request finished
    await client.close()
    lat = np.array(out["latency"]) if out["latency"] else np.array([float("nan")])
    return {
        "clients": clients, "duration_s": duration_s, "wall_s": round(wall, 2), "max_tokens": max_tokens,
        "models": models, "stream_share": round(1 / stream_every, 3) if stream_every else 0.0,
        "requests": len(out["latency"]), "errors": len(out["errors"]), "error_examples": out["errors"][:5],
        "requests_per_s": round(len(out["latency"]) / wall, 2),
        "latency_s": {k: round(float(v), 3) for k, v in
                      {"p50": np.percentile(lat, 50), "p90": np.percentile(lat, 90), "p99": np.percentile(lat, 99),
                       "mean": lat.mean(), "max": lat.max()}.items()},
    }


def run_load(base_url: str, models: list[str], clients: int = 50, duration_s: float = 20.0, max_tokens: int = 16,
             stream_every: int = 4) -> dict[str, Any]:
    """``clients`` concurrent clients for ``duration_s``; every ``stream_every``-th request streams (0 = none)."""
    return asyncio.run(_run(base_url, models, clients, duration_s, max_tokens, stream_every))


def random_lora(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> str:
    """A rank-8 LoRA with random (not zero) B, so the adapted model differs from the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rr_ray.models.loader import load_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(load_model(model_dir), LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                                  target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(out_dir)
    return str(out_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="API base of a running server (else one is started here)")
    parser.add_argument("--name", default="rr-ray", help="served name of the unlearned model")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", help="composed LoRA dir (default: a random LoRA)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream-every", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=16, help="hf engine: requests per batch")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs (and torch threads) of the replica")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    a = parser.parse_args()
    models = [a.name, f"{a.name}-base"]
    started = a.url is None
    if started:
        from ray import serve

        from rr_ray.cluster import connect
        from rr_ray.models.loader import resolve_model
        from rr_ray.serving.app import build_app

        connect()
        model_dir = resolve_model(a.model)
        adapter = a.adapter or random_lora(model_dir, tempfile.mkdtemp(prefix="serve-load-lora-"))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"model": str(model_dir), "adapter": adapter, "served_name": a.name,
                         "num_cpus": a.num_cpus, "max_batch_size": a.max_batch_size})
        serve.run(app, name="serve-load", route_prefix="/")
        a.url = f"http://127.0.0.1:{port}/v1"
    try:
        run_load(a.url, models, clients=4, duration_s=2, max_tokens=a.max_tokens)  # warm-up, not reported
        result = run_load(a.url, models, a.clients, a.duration, a.max_tokens, a.stream_every)
    finally:
        if started:
            serve.shutdown()
    result.update(model=a.model if started else a.url, replica_cpus=a.num_cpus if started else None,
                  max_batch_size=a.max_batch_size if started else None,
                  cpu_count=os.cpu_count())
    lat = result["latency_s"]
    print(f"{result['requests']} requests, {result['errors']} errors in {result['wall_s']} s with {a.clients} "
          f"clients: {result['requests_per_s']} req/s; latency p50 {lat['p50']} s, p90 {lat['p90']} s, "
          f"p99 {lat['p99']} s (max {lat['max']} s)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
