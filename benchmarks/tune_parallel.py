"""Ray Tune's parallel weight sweep vs the same sweep one trial at a time, on the same CPUs.

Both ways score the same K candidate coefficients of one forget PEM (s and u of the code task on the same
evaluation subset) with ``rr_ray.release.search.sweep``:
  sequential: one trial at a time, each trial using every CPU (torch threads = CPUs);
  parallel:   one trial per CPU, all running at once (torch threads = 1 each).
Same model, same adapter, same data, one run; prints both wall times, the ratio and checks the scores agree.

    python benchmarks/tune_parallel.py [--model smollm2-135m-instruct] [--k 4] [--limit 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_pem(model_dir: str, out: Path, seed: int = 0) -> Path:
    """A LoRA with non-zero B (what a trained PEM looks like to the scorer)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rr_ray.models.loader import load_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    model.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--k", type=int, default=4, help="candidate coefficients")
    ap.add_argument("--limit", type=int, default=8, help="evaluation items per score")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    from rr_ray.cluster import connect
    from rr_ray.config import RayConfig, RRConfig, TaskConfig
    from rr_ray.evaluation.scoring import scorer_spec
    from rr_ray.models.loader import resolve_model
    from rr_ray.release.search import sweep

    model_dir = str(resolve_model(args.model))
    connect(RayConfig(num_cpus=args.cpus))
    coefs = [-(i + 1) * 0.5 for i in range(args.k)]
    task = TaskConfig(name="code", scoring_batch_size=8)
    with tempfile.TemporaryDirectory() as tmp:
        pem = str(random_pem(model_dir, Path(tmp) / "pem"))
        common = dict(model=model_dir, current=None, adapter=pem, kind="forget", step="bench", coefs=coefs,
                      task_cfg=task, limit=args.limit, storage_uri=str(Path(tmp) / "ray"),
                      scorer=scorer_spec(RRConfig(task=task)))
        t0 = time.perf_counter()
        seq = sweep(**common, name="sequential", cpus_per_trial=args.cpus, max_concurrent=1)
        t_seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        par = sweep(**common, name="parallel", cpus_per_trial=1)
        t_par = time.perf_counter() - t0
    diff = max(abs(a["s"] - b["s"]) + abs(a["u"] - b["u"]) for a, b in zip(seq.trials, par.trials))
    result = {"model": args.model, "k": args.k, "limit": args.limit, "cpus": args.cpus,
              "sequential_s": round(t_seq, 1), "parallel_s": round(t_par, 1), "ratio": round(t_seq / t_par, 2),
              "max_score_diff": diff, "measured": "wall time of a Tune sweep of K coefficients, code task s+u"}
    print(f"sequential (1 trial x {args.cpus} threads): {t_seq:.1f} s; parallel ({args.cpus} trials x 1 thread): "
          f"{t_par:.1f} s; ratio {t_seq / t_par:.2f}x; max |score diff| {diff:.2e}")
    out = Path(__file__).parent / "results" / "tune_parallel.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
