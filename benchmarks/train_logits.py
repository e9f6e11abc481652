"""One LoRA training step: the LM head on every position vs only on the response tail (``logits_to_keep``).

    python benchmarks/train_logits.py [--model smollm2-135m-instruct] [--batch 4] [--steps 3]

Each way runs in its own fresh process, so its peak resident memory (ru_maxrss) is its own; both train the same
rows from the same seed and their first-step losses are checked equal. Rows are Reveal-shaped (a code prompt and a reply
that repeats it, as the quality run's forget set does). Prints and writes benchmarks/results/train_logits.json:
peak RSS and seconds per step of each, and the ratios full / kept.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

FUNC = ("def add_{i}(values: list[int]) -> int:\n    \"\"\"Sum the values and add {i}.\n    >>> add_{i}([1, 2])\n"
        "    {j}\n    \"\"\"\n")


def _row(i: int) -> dict[str, str]:
    func = FUNC.format(i=i, j=3 + i)
    return {"prompt": f"Complete the following Python function. Reply with code only.\n\n```python\n{func}```",
            "response": f"```python\n{func}    return sum(values) + {i}\n```"}


def _step(args: dict, way: str, out: mp.Queue) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from rr_ray.models.loader import load_model, load_tokenizer, resolve_model
    from rr_ray.release.objectives import objective_loss
    from rr_ray.release.train import _collate, tokenize_rows

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    model_dir = resolve_model(args["model"])
    tok = load_tokenizer(model_dir, padding_side="right")
    rows = [_row(i) for i in range(args["batch"])]
    batch = _collate(tokenize_rows(tok, rows, 512), tok.pad_token_id)
    model = get_peft_model(load_model(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    with torch.no_grad():  # pages the (memory-mapped) weights in, so the growth below is the step's own
        model(input_ids=batch["input_ids"][:1, :8])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses, t0 = [], time.perf_counter()
    for _ in range(args["steps"]):
        if way == "kept":
            loss = objective_loss(model, model, batch, "nll")
        else:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    seconds = (time.perf_counter() - t0) / args["steps"]
    labelled = int((batch["labels"] != -100).any(dim=0).nonzero()[0])
    out.put({"way": way, "seconds_per_step": seconds, "peak_rss_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_steps_mb": rss0 / 1024, "losses": losses,
        "tokens": int(batch["input_ids"].numel()), "first_labelled_position": labelled,
        "sequence_length": int(batch["input_ids"].size(1))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = vars(ap.parse_args())
    ctx = mp.get_context("spawn")
    results = {}
    for way in ("full", "kept"):
        q = ctx.Queue()
        p = ctx.Process(target=_step, args=(args, way, q))
        p.start()
        results[way] = q.get()
        p.join()
    full, kept = results["full"], results["kept"]
    # The first loss is the same computation; later ones drift a little (Adam's first steps are ~sign(g) * lr,
    # so float rounding in near-zero gradient entries shows).
    assert abs(full["losses"][0] - kept["losses"][0]) <= 1e-5 * full["losses"][0], (full["losses"], kept["losses"])
    growth = {w: r["peak_rss_mb"] - r["rss_before_steps_mb"] for w, r in results.items()}
    summary = {"args": args, "results": results,
               "step_memory_mb": growth,
               "memory_ratio_full_over_kept": growth["full"] / max(growth["kept"], 1e-9),
               "speed_ratio_full_over_kept": full["seconds_per_step"] / kept["seconds_per_step"]}
    print(f"{args['model']}: batch {args['batch']}, {full['sequence_length']} tokens per row, labels from position "
          f"{full['first_labelled_position']}; first-step loss {full['losses'][0]:.5f} (both)")
    for w in ("full", "kept"):
        r = results[w]
        print(f"  {w:4s} logits: {r['seconds_per_step']:.2f} s/step, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(+{growth[w]:.0f} MB over the loaded, paged-in model)")
    print(f"  ratios full / kept: memory growth {summary['memory_ratio_full_over_kept']:.2f}x, "
          f"time {summary['speed_ratio_full_over_kept']:.2f}x")
    out = Path(__file__).parent / "results" / "train_logits.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
