"""Instruction ceiling: each instruction a finished reveal decoded, answered on all of C, vs no instruction.

    python benchmarks/instruction_ceiling.py RUN_DIR [--instruction TEXT ...] [--limit N]

Algorithm 1 can only pick among the instructions its soft prompts decode to. This answers the run's whole
reveal context set C with every distinct decoded instruction, with any hand-written extras, and with none
(the plain task prompt), using the run's own config (run.yaml: model, decoding, task oracle), and prints the
mean relevance of each side by side. The ratio best-instruction / no-instruction says whether the search
space holds any instruction that raises relevance over the plain prompt: below 1, no choice of NeuralUCB
could make the forget set beat the plain prompt on relevance. Writes benchmarks/results/instruction_ceiling.json
and a bar chart beside it (instruction_ceiling.png).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "instruction_ceiling.json"
COLOURS = {"none (plain prompt)": "tab:gray", "hand-written": "tab:orange", "decoded": "tab:blue"}


def plot(rows: list[dict], title: str, path: Path) -> None:
    """One horizontal bar per instruction, the no-instruction level as a line across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.2))
    labels = [(r["instruction"] or "(none)")[:60] for r in rows]
    ax.barh(range(len(rows)), [r["mean_relevance"] for r in rows], color=[COLOURS[r["kind"]] for r in rows])
    for kind, colour in COLOURS.items():
        ax.barh([0], [0], color=colour, label=kind)  # legend entries only
    ax.axvline(rows[0]["mean_relevance"], color="black", linestyle="--", linewidth=1, label="no-instruction level")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("mean relevance on all reveal contexts")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run directory whose reveal stage has decoded its candidates")
    ap.add_argument("--instruction", action="append", default=[], help="a hand-written instruction to add")
    ap.add_argument("--limit", type=int, help="score at most this many decoded instructions")
    args = ap.parse_args()

    import numpy as np
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from rr_ray import cluster
    from rr_ray.config import config_from_text
    from rr_ray.generation.base import Request
    from rr_ray.generation.pool import GeneratorPool
    from rr_ray.models.loader import resolve_model
    from rr_ray.reveal.loop import reveal_params
    from rr_ray.reveal.scoring import prompt_for
    from rr_ray.storage import RunDir
    from rr_ray.tasks import get_task

    run = RunDir.open(args.run_dir)
    cache = "reveal/candidates/instructions.json"
    if not run.exists(cache):
        raise SystemExit(f"{run.uri}: no {cache}; run `rr-ray reveal` on it first")
    cfg = config_from_text(run.read_text("run.yaml"), f"{run.uri}/run.yaml")
    decoded = list(dict.fromkeys(c["instruction"] for c in run.read_json(cache)["candidates"]))
    decoded = decoded[: args.limit] if args.limit else decoded
    task = get_task(cfg.task)
    contexts = task.contexts(cfg.task.num_contexts, cfg.run.seed)  # C of Algorithm 1, as the reveal drew it
    sides = [("none (plain prompt)", "")] + [("hand-written", t) for t in args.instruction] + [
        ("decoded", t) for t in decoded]

    cluster.connect(cfg.ray)
    model_dir = str(resolve_model(cfg.model.name_or_path, cfg.model.cache_dir, cfg.run.s3_endpoint_url))
    pool = GeneratorPool(cfg.generation, model_dir, seed=cfg.run.seed)
    rows, t0 = [], time.perf_counter()
    try:
        for kind, instruction in tqdm(sides, desc="instructions x all contexts"):
            prompts = [prompt_for(instruction, c) for c in contexts]
            outs = pool.generate([Request(p) for p in prompts], reveal_params(cfg))
            rel = task.relevance(prompts, [o[0].text for o in outs])
            rows.append({"kind": kind, "instruction": instruction, "mean_relevance": float(np.mean(rel)),
                         "relevance": [float(r) for r in rel]})
    finally:
        pool.shutdown()

    plain = rows[0]["mean_relevance"]
    best = max(rows[1:], key=lambda r: r["mean_relevance"])
    title = f"relevance on all {len(contexts)} reveal contexts ({cfg.task.name}, {cfg.model.name_or_path})"
    table = Table(title=title)
    for col in ("instruction", "kind", "mean relevance", "vs none"):
        table.add_column(col)
    for r in rows:
        table.add_row(repr(r["instruction"][:70]), r["kind"], f"{r['mean_relevance']:.4f}",
                      f"{r['mean_relevance'] / plain:.3f}x" if plain else "")
    console = Console()
    console.print(table)
    ratio = best["mean_relevance"] / plain if plain else float("inf")
    console.print(f"best instruction / no instruction: {ratio:.3f}x ({best['instruction']!r}); "
                  f"{sum(r['mean_relevance'] > plain for r in rows[1:])} of {len(rows) - 1} beat no instruction; "
                  f"{time.perf_counter() - t0:.0f} s")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"run": run.uri, "task": cfg.task.name, "model": cfg.model.name_or_path,
                                   "contexts": len(contexts), "best_over_none": ratio, "rows": rows}, indent=1))
    plot(rows, title, RESULTS.with_suffix(".png"))


if __name__ == "__main__":
    main()
