"""Scoring K candidate merge weights of one PEM on top of an edit log: together vs one at a time, in one run.

The Release step (paper section 3.2) scores every candidate coefficient of a new PEM on the same eval data.
Two ways, same model, same data, same batch size, same threads:

  (a) together: each candidate is the edit log plus the PEM at that coefficient, composed exactly into ONE
      stacked LoRA dir (rr_ray.release.pem.compose); all K dirs are loaded in one HFGenerator and ONE loglik
      pass runs over data x K rows, each row with its own adapter (Scorer.loglik with one adapter per row:
      peft mixed-adapter batches).
  (b) one at a time: for each candidate merge the log into the plain model's weights (pem.merged), score the
      data, restore the weights.

Both must give the same scores (max abs diff reported); the wall-time ratio (b)/(a) is printed and written
to benchmarks/results/weight_sweep.json. The LoRAs are random (peft, B != 0, shrunk so the model stays sane):
timing and agreement do not depend on how they were trained.

    .venv/bin/python benchmarks/weight_sweep.py [--model smollm2-135m-instruct] [--n 4] [--k 8] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from rr_ray.evaluation.scoring import Scorer  # noqa: E402
from rr_ray.generation.base import Request  # noqa: E402
from rr_ray.generation.hf_generator import HFGenerator  # noqa: E402
from rr_ray.models.loader import describe_model, resolve_model  # noqa: E402
from rr_ray.release.pem import Edit, EditLog, compose, merged  # noqa: E402
from rr_ray.tasks import packaged_data  # noqa: E402

COEFS = [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]


def random_lora(model_dir: Path, out: Path, seed: int, b_scale: float) -> str:
    """A peft LoRA (r=8, alpha=16, q/v: the config default) with random A and small random B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    model.save_pretrained(out)
    return str(out)


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    """Token slots HFGenerator.loglik computes (it length-sorts rows, then pads each batch to its longest)."""
    order = sorted(lengths)
    return sum(max(order[i: i + batch_size]) * len(order[i: i + batch_size]) for i in range(0, len(order), batch_size))


def mean_loglik(pairs: list[tuple[float, int]]) -> float:
    return -sum(n for n, _ in pairs) / sum(t for _, t in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=4, help="HumanEval canonical solutions scored per candidate")
    ap.add_argument("--k", type=int, default=8, choices=range(1, len(COEFS) + 1), metavar="K")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--b-scale", type=float, default=0.2, help="shrink factor for the random lora_B")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "weight_sweep.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()  # other work on the machine skews both ways alike; recorded for the reader

    model_dir = resolve_model(args.model)
    problems = packaged_data.humaneval()[: args.n]
    # raw HumanEval prompt -> canonical solution body (no chat template: shorter rows, same math for both ways)
    prompts = [p["prompt"] for p in problems]
    refs = [p["canonical_solution"] for p in problems]
    coefs = COEFS[: args.k]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        earlier = random_lora(model_dir, tmp / "forget0", 0, args.b_scale)
        pem = random_lora(model_dir, tmp / "retain1", 1, args.b_scale)
        log = EditLog(args.model, (Edit(earlier, -1.0, "forget", "mu_0"),))
        logs = [log.then(Edit(pem, c, "retain", "lambda_1")) for c in coefs]

        # (a) together: K composed adapters, one mixed-adapter pass over data x K rows
        gen = HFGenerator(model_dir, dtype="float32", threads=args.threads, batch_size=args.batch_size)
        t0, c0 = time.perf_counter(), time.process_time()
        dirs = [str(compose(lg, tmp / f"cand{k}")) for k, lg in enumerate(logs)]
        t_compose = time.perf_counter() - t0
        gen.loglik([Request("x", chat=False, adapter=d) for d in dirs], ["y"] * len(dirs))  # loads the K adapters
        t_load = time.perf_counter() - t0 - t_compose
        row_adapters = [d for d in dirs for _ in prompts]
        out = Scorer(gen).loglik(prompts * len(dirs), refs * len(dirs), adapter=row_adapters, chat=False)
        t_together, c_together = time.perf_counter() - t0, time.process_time() - c0
        together = [out[k * len(prompts): (k + 1) * len(prompts)] for k in range(len(dirs))]
        del gen

        # (b) one candidate at a time: merge into the plain model's weights, score, restore
        plain = HFGenerator(model_dir, dtype="float32", threads=args.threads, batch_size=args.batch_size)
        t0, c0 = time.perf_counter(), time.process_time()
        single = []
        for lg in logs:
            with merged(plain.model, lg):
                single.append(plain.loglik([Request(p, chat=False) for p in prompts], refs))
        t_single, c_single = time.perf_counter() - t0, time.process_time() - c0
        base = plain.loglik([Request(p, chat=False) for p in prompts], refs)

    row_diff = max(abs(a[0] - b[0]) for ta, tb in zip(together, single) for a, b in zip(ta, tb))
    mean_a, mean_b = [mean_loglik(t) for t in together], [mean_loglik(t) for t in single]
    tok = plain.tokenizer
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"])
               + len(tok(r, add_special_tokens=False)["input_ids"]) for p, r in zip(prompts, refs)]
    tokens = sum(lengths)
    result = {
        "what": "score K candidate coefficients of one LoRA on top of a one-edit log: mean token loglik of "
                "HumanEval canonical solutions; (a) K composed adapters in one mixed-adapter loglik pass vs "
                "(b) merge/score/restore per candidate",
        "model": args.model, "model_info": describe_model(model_dir), "dtype": "float32",
        "threads": args.threads, "batch_size": args.batch_size, "n_texts": len(prompts), "k": len(coefs),
        "tokens_per_candidate": tokens, "coefs": coefs,
        # same real tokens both ways; what differs is padding: (a) batches K copies of equal-length rows together
        "padded_tokens_together": padded_tokens(lengths * len(coefs), args.batch_size),
        "padded_tokens_one_at_a_time": len(coefs) * padded_tokens(lengths, args.batch_size),
        "together_s": round(t_together, 3), "together_compose_s": round(t_compose, 3),
        "together_adapter_load_s": round(t_load, 3), "one_at_a_time_s": round(t_single, 3),
        "speedup_one_at_a_time_over_together": round(t_single / t_together, 3),
        # CPU seconds of this process: less sensitive than wall time to other jobs sharing the cores
        "together_cpu_s": round(c_together, 3), "one_at_a_time_cpu_s": round(c_single, 3),
        "cpu_time_ratio": round(c_single / c_together, 3),
        "max_abs_diff_row_nll": row_diff,
        "max_abs_diff_mean_loglik": max(abs(a - b) for a, b in zip(mean_a, mean_b)),
        "base_mean_loglik": mean_loglik(base), "mean_loglik_together": mean_a, "mean_loglik_one_at_a_time": mean_b,
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "loadavg_start_end": [load_start, os.getloadavg()],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "model_info"}, indent=2))
    print(f"together {t_together:.1f}s (compose {t_compose:.1f}s, load {t_load:.1f}s) vs one at a time "
          f"{t_single:.1f}s: ratio {t_single / t_together:.2f}x (CPU time "
          f"{c_together:.1f}s vs {c_single:.1f}s: {c_single / c_together:.2f}x); max |diff| row NLL {row_diff:.2e}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
