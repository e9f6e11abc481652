"""Scoring K sweep candidates with vLLM: all K in one engine call vs one call per candidate, and hf beside them.

A weight-sweep step (paper section 3.2) scores the current edit log plus a new PEM at K coefficients. Each
candidate is composed into one stacked LoRA dir (``pem.compose``), exactly as ``release/search.py`` does.
Same engine (loaded once, not timed), same rows (HumanEval canonical solutions after their prompts):

  (a) together: one ``VLLMGenerator.loglik`` call over data x K rows, each row with its candidate's
      ``LoRARequest`` (what ``task.scoring_backend: vllm`` runs);
  (b) one at a time: K calls, one candidate each;
  (c) hf: ``HFGenerator.loglik`` over the same data x K rows (peft mixed-adapter batches), the CPU default.

Prints wall times, the ratios (b)/(a) and (c)/(a), and the largest disagreement between the ways; writes
``benchmarks/results/vllm_scoring.json``. The LoRAs are random (timing does not depend on training).

    .venv/bin/python benchmarks/vllm_scoring.py [--k 8] [--n 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks.* siblings

from benchmarks.weight_sweep import COEFS, random_lora  # noqa: E402
from rr_ray.generation.base import Request  # noqa: E402
from rr_ray.models.loader import resolve_model  # noqa: E402
from rr_ray.release.pem import Edit, EditLog, compose  # noqa: E402
from rr_ray.tasks import packaged_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="HumanEval canonical solutions per candidate")
    ap.add_argument("--b-scale", type=float, default=0.2)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "vllm_scoring.json"))
    args = ap.parse_args()

    from rr_ray.generation.hf_generator import HFGenerator
    from rr_ray.generation.vllm_generator import VLLMGenerator

    model_dir = str(resolve_model("smollm2-135m-instruct"))
    problems = packaged_data.humaneval()[: args.n]
    prompts, refs = [p["prompt"] for p in problems], [p["canonical_solution"] for p in problems]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log = EditLog("smollm2-135m-instruct",
                      (Edit(random_lora(Path(model_dir), root / "f0", 0, args.b_scale), -1.0, "forget", "mu_0"),))
        pem = random_lora(Path(model_dir), root / "r1", 1, args.b_scale)
        dirs = [str(compose(log.then(Edit(pem, c, "retain", "lambda_1")), root / f"cand{k}"))
                for k, c in enumerate(COEFS[: args.k])]
        rows = [(Request(p, chat=False, adapter=d), r) for d in dirs for p, r in zip(prompts, refs)]
        reqs, conts = [q for q, _ in rows], [c for _, c in rows]

        gen = VLLMGenerator(model_dir, dtype="float32", max_lora_rank=16, max_loras=args.k, cpu_kvcache_gib=2,
                            lora_modules=["q_proj", "v_proj"])
        gen.loglik(reqs[:: len(prompts)], ["x"] * len(dirs))  # load every adapter once, outside the timings
        t = time.perf_counter()
        together = gen.loglik(reqs, conts)
        t_together = time.perf_counter() - t
        t = time.perf_counter()
        single = []
        for k in range(len(dirs)):
            part = slice(k * len(prompts), (k + 1) * len(prompts))
            single += gen.loglik(reqs[part], conts[part])
        t_single = time.perf_counter() - t
        del gen

        hf = HFGenerator(model_dir, dtype="float32", batch_size=8)
        hf.loglik(reqs[:: len(prompts)], ["x"] * len(dirs))
        t = time.perf_counter()
        ref = hf.loglik(reqs, conts)
        t_hf = time.perf_counter() - t

    tokens = sum(n for _, n in together)
    result = {
        "what": f"teacher-forced loglik of {len(prompts)} HumanEval solutions under each of K={len(dirs)} composed "
                "candidate adapters (a one-edit log + a PEM at K coefficients), SmolLM2-135M fp32",
        "scored_tokens": tokens, "cpus": os.cpu_count(),
        "vllm_together_s": round(t_together, 2), "vllm_one_at_a_time_s": round(t_single, 2), "hf_s": round(t_hf, 2),
        "one_at_a_time_over_together": round(t_single / t_together, 2), "hf_over_vllm_together": round(t_hf / t_together, 2),
        "max_abs_diff_nll_together_vs_single": max(abs(a[0] - b[0]) for a, b in zip(together, single)),
        "max_abs_diff_nll_vllm_vs_hf": max(abs(a[0] - b[0]) for a, b in zip(together, ref)),
    }
    print(json.dumps(result, indent=2))
    print(f"vllm: one call {t_together:.1f} s vs one per candidate {t_single:.1f} s = {t_single / t_together:.2f}x; "
          f"hf mixed batches {t_hf:.1f} s = {t_hf / t_together:.2f}x the vllm one-call time")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
