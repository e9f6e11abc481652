"""``rr-ray report RUN``: one markdown file (report/report.md + its PNGs) that summarises a run on its own.

Sections follow the paper's presentation: base vs unlearned model on the task's metrics (Tables 2-4), the
Release steps of equation 1 (Tables 7-9), how far apart the retain and forget PEMs live (section 4.1, Table 1),
the best Reveal instructions per outer iteration (Appendix A.1),
the forget set's size, diversity (Vendi) and relevance, and the wall time of every stage. A stage that has
not run is reported as such, never guessed. The report only reads the run, so it is rewritten every time.
"""

from __future__ import annotations

import io
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rr_ray.config import RRConfig
from rr_ray.release.loop import step_label, steps_markdown
from rr_ray.storage import DONE_DIR, RunDir

STAGE = "report"
STAGES = ("reveal", "release", "evaluate", "export")  # pipeline order
NOT_RUN = "not run"


def _read_json(run: RunDir, rel: str) -> Any | None:
    return run.read_json(rel) if run.exists(rel) else None


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def _change(base: Any, final: Any) -> str:
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not isinstance(final, (int, float)):
        return ""
    diff = final - base
    if diff == 0:
        return "0"
    pct = 100 * diff / abs(base) if base else None
    rel = "" if pct is None else f" ({pct:+.1f} %)" if abs(pct) >= 0.1 else f" ({pct:+.2g} %)"
    return f"{diff:+.4g}{rel}"


def _metrics(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(side, metric) in the order evaluate() wrote them: forget side first, then utility."""
    return [(side, key) for side in ("forget", "utility") for key in (result.get(side) or {})]


def eval_section(base: dict[str, Any] | None, final: dict[str, Any] | None) -> str:
    """Tables 2-4 shape: one column per metric, rows base model / unlearned model / change."""
    if base is None or final is None:
        missing = " and ".join(f"eval/{n}.json" for n, r in (("base", base), ("final", final)) if r is None)
        return f"## Base vs unlearned model\n\nEvaluation {NOT_RUN} ({missing} missing).\n"
    cols = list(dict.fromkeys(_metrics(base) + _metrics(final)))

    def get(r: dict[str, Any], side: str, key: str) -> Any:
        return (r.get(side) or {}).get(key, "—")

    head = "| model | " + " | ".join(f"{side}: {key}" for side, key in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for label, r in (("Base model", base), ("Unlearned (final)", final)):
        lines.append(f"| {label} | " + " | ".join(_num(get(r, s, k)) for s, k in cols) + " |")
    lines.append("| change | " + " | ".join(_change(get(base, s, k), get(final, s, k)) for s, k in cols) + " |")
    limit = final.get("limit")
    note = (f"Task `{final.get('task')}`; s is the forget score (lower = more forgotten), u the utility score "
            f"(higher = better kept); {'all' if limit is None else f'at most {limit}'} items per score, from the "
            f"test half of the held-out items (the merge weights were chosen on the other half). "
            f"Final model: base + `{final.get('adapter')}`.")
    return "## Base vs unlearned model\n\n" + "\n".join(lines) + "\n\n" + note + "\n"


def eval_png(base: dict[str, Any], final: dict[str, Any]) -> bytes | None:
    """One small bar panel per float metric (scales differ: perplexity vs rates), base vs final."""
    cols = [(s, k) for s, k in _metrics(base) if isinstance((base.get(s) or {}).get(k), float)
            and isinstance((final.get(s) or {}).get(k), float)]
    if not cols:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cols)
    ncols = min(n, 4)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * nrows), squeeze=False)
    for ax, (side, key) in zip(axes.flat, cols):
        vals = [base[side][key], final[side][key]]
        bars = ax.bar(["base", "final"], vals, color=["tab:gray", "tab:red" if side == "forget" else "tab:green"])
        ax.bar_label(bars, fmt="%.4g", fontsize=7)
        ax.set_title(f"{side}: {key}", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{final.get('task')}: base vs unlearned model", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def release_section(run: RunDir) -> str:
    """Tables 7-9 (release/steps.md) plus each step's training loss and train / sweep time."""
    steps = _read_json(run, "release/steps.json")
    if not steps:
        return f"## Release steps (equation 1)\n\nRelease {NOT_RUN} or unfinished (no release/steps.json).\n"
    table = run.read_text("release/steps.md") if run.exists("release/steps.md") else steps_markdown(steps)
    lines = ["| step | weight applied | trials | train loss per epoch | train s | sweep s | total s |",
             "|---:|---|---:|---|---:|---:|---:|"]
    for rec in steps[1:]:
        losses = (rec.get("train") or {}).get("losses") or []
        sec = rec.get("seconds") or {}
        lines.append(f"| {rec['index']} | {step_label(rec)} | {len(rec.get('trials') or [])} | "
                     f"{' → '.join(f'{x:.4f}' for x in losses) or '—'} | {_num(sec.get('train', '—'))} | "
                     f"{_num(sec.get('sweep', '—'))} | {_num(sec.get('total', '—'))} |")
    info = run.done_info("release")
    summary = ""
    if info:
        summary = (f"\nForget score s {info['s_base']:.4g} → {info['s_final']:.4g} (down "
                   f"{100 * info['forget_drop']:.1f} %), utility u {info['u_base']:.4g} → {info['u_final']:.4g} "
                   f"({100 * info['utility_kept']:.1f} % of base kept), {info['steps']} steps.\n")
    return ("## Release steps (equation 1)\n\nScores on the validation half of the held-out items (where the "
            "sweep chose each weight); rows in the order of equation 1.\n\n" + table.rstrip() + "\n" + summary
            + "\nTraining and coefficient sweep per step:\n\n" + "\n".join(lines) + "\n")


SUBSPACE_K = 8  # Table 1's top-k


def subspace_section(run: RunDir) -> str:
    """Table 1 for this run: each retain PEM against each forget PEM, over the target modules of all layers."""
    from rr_ray.release.subspace import adapter_similarity

    steps = _read_json(run, "release/steps.json") or []
    trained = {kind: [r["step"] for r in steps if r.get("kind") == kind and run.exists(f"release/{r['step']}/adapter/"
                                                                                      "adapter_config.json")]
               for kind in ("retain", "forget")}
    if not trained["retain"] or not trained["forget"]:
        return ("## Retain vs forget subspaces (section 4.1)\n\nNeeds a trained retain and forget PEM; "
                f"this run has {len(trained['retain'])} and {len(trained['forget'])}.\n")
    lines = ["| retain PEM | forget PEM | modules | Sim mean | Sim std | normalised mean |", "|---|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="rr-ray-report-") as tmp:
        local: dict[str, Path] = {}
        for step in trained["retain"] + trained["forget"]:
            rel = f"release/{step}/adapter"
            path = run.local_path(rel)
            if path is None:  # an S3 run: fetch the small adapter files
                path = Path(tmp) / step
                run.download_dir(rel, path)
            local[step] = path
        for r in trained["retain"]:
            for f in trained["forget"]:
                rep = adapter_similarity(local[r], local[f], SUBSPACE_K)
                (mean, std), (nmean, _) = rep.stats(), rep.stats(normalised=True)
                lines.append(f"| {r} | {f} | {len(rep.modules)} | {mean:.4f} | {std:.4f} | {nmean:.4f} |")
    return ("## Retain vs forget subspaces (section 4.1)\n\nSim = ||U_r^T U_f||_F / k of the top-k (k = "
            f"{SUBSPACE_K}) left singular vectors of each module's update (paper Table 1; at most 1/sqrt(k) = "
            f"{SUBSPACE_K ** -0.5:.3f}); normalised = ||U_r^T U_f||_F^2 / k, 0 for orthogonal and 1 for the same "
            "subspace.\n\n" + "\n".join(lines) + "\n")


def instructions_section(run: RunDir) -> str:
    """Appendix A.1 shape: the best instruction P* of each outer iteration."""
    best = _read_json(run, "reveal/best_instructions.json")
    if best is None:
        return f"## Best instructions (Reveal)\n\nReveal {NOT_RUN}.\n"
    if not best:
        return ("## Best instructions (Reveal)\n\nNone: Reveal answered the task's own prompts (direct mode), "
                "without an instruction search.\n")
    lines = []
    for k, b in enumerate(best, 1):
        if isinstance(b, dict):
            extra = ", ".join(f"{n} {b[n]:.3f}" for n in ("score", "relevance", "diversity")
                              if isinstance(b.get(n), (int, float)))
            lines.append(f"- Outer iteration {b.get('outer_iteration', k)}: {b.get('instruction', '')}"
                         + (f" ({extra})" if extra else ""))
        else:
            lines.append(f"- Outer iteration {k}: {b}")
    return "## Best instructions (Reveal)\n\n" + "\n".join(lines) + "\n"


def forget_section(run: RunDir, cfg: RRConfig) -> str:
    """Size, diversity (Vendi) and mean relevance of the self-generated forget set D_self-gen."""
    info = run.done_info("reveal") or {}
    rows = run.read_jsonl("reveal/forget.jsonl") if run.exists("reveal/forget.jsonl") else None
    if rows is None and not info:
        src = (f" Release read its forget set from `release.forget_path` = `{cfg.release.forget_path}`."
               if cfg.release.forget_path else "")
        return f"## Forget set\n\nReveal {NOT_RUN}.{src}\n"
    rel = [r["relevance"] for r in rows or [] if isinstance(r.get("relevance"), (int, float))]
    size = info.get("forget_size", len(rows or []))
    mean_rel = info.get("mean_relevance", sum(rel) / len(rel) if rel else None)
    vendi = info.get("forget_vendi")
    shown_rel = _num(mean_rel) if mean_rel is not None else "—"
    shown_vendi = _num(vendi) if vendi is not None else "not recorded (reveal unfinished)"
    lines = ["| forget rows | mean relevance | Vendi score |", "|---:|---:|---:|",
             f"| {size} | {shown_rel} | {shown_vendi} |"]
    per_outer: dict[Any, list[float]] = {}
    for r in rows or []:
        per_outer.setdefault(r.get("outer", "?"), []).append(float(r.get("relevance", 0.0)))
    if len(per_outer) > 1:
        lines += ["", "| outer iteration | rows | mean relevance |", "|---:|---:|---:|"]
        lines += [f"| {k} | {len(v)} | {sum(v) / len(v):.4g} |" for k, v in per_outer.items()]
    mode = f"\nReveal mode: {info['mode']}.\n" if info.get("mode") else ""
    return "## Forget set\n\n" + "\n".join(lines) + "\n" + mode


def _seconds(info: dict[str, Any]) -> float | None:
    v = info.get("seconds", info.get("wall_s"))
    if isinstance(v, dict):  # per-part times (e.g. evaluate's forget/utility): the stage took their sum
        parts = [x for x in v.values() if isinstance(x, (int, float))]
        return sum(parts) if parts else None
    return v if isinstance(v, (int, float)) else None


def timings_section(run: RunDir) -> str:
    """Wall time per stage from the done markers; sub-steps (release-mu_0-train, ...) under their stage."""
    done = {name.removeprefix(f"{DONE_DIR}/").removesuffix(".json") for name in run.list(DONE_DIR)}
    # Sub-steps in the order they ran (eq. 1's order for release), not alphabetically.
    order = [rec["step"] for rec in _read_json(run, "release/steps.json") or []]

    def rank(name: str) -> tuple[int, str]:  # "release-mu_0-train" -> position of mu_0
        return next((i for i, step in enumerate(order) if f"-{step}-" in f"{name}-"), len(order)), name

    lines = ["| stage | wall time (s) |", "|---|---:|"]
    total = 0.0
    for stage in STAGES:
        info = run.done_info(stage) if stage in done else None
        sec = _seconds(info) if info is not None else None
        total += sec or 0.0
        lines.append(f"| {stage} | {NOT_RUN if info is None else _num(sec) if sec is not None else '—'} |")
        for sub in sorted((d for d in done if d.startswith(f"{stage}-")), key=rank):
            sub_sec = _seconds(run.done_info(sub) or {})
            if sub_sec is not None:
                lines.append(f"| &nbsp;&nbsp;{sub} | {_num(sub_sec)} |")
    lines.append(f"| **total** (stages that ran) | {total:.1f} |")
    return "## Timings\n\n" + "\n".join(lines) + "\n"


def _figures(run: RunDir, eval_png_bytes: bytes | None) -> dict[str, tuple[str, bytes]]:
    """report/<file> -> (caption, PNG bytes): copied from the run or drawn here."""
    figs: dict[str, tuple[str, bytes]] = {}
    if eval_png_bytes:
        figs["eval_base_vs_final.png"] = ("Base vs unlearned model on the task's metrics", eval_png_bytes)
    for src, dst, caption in (("release/metrics.png", "release_steps.png", "Release: s and u across the steps"),
                              ("reveal/progress.png", "reveal_progress.png", "Reveal: candidate scores")):
        if run.exists(src):
            figs[dst] = (caption, run.read_bytes(src))
    return figs


def write_report(run: RunDir, cfg: RRConfig) -> str:
    """Write report/report.md and its PNGs into ``run``; returns the URI of report.md."""
    t0 = time.perf_counter()
    base, final = _read_json(run, "eval/base.json"), _read_json(run, "eval/final.json")
    figs = _figures(run, eval_png(base, final) if base and final else None)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    export = run.done_info("export")
    title = (f"# Reveal-and-Release report: {cfg.task.name} unlearning of {cfg.model.name_or_path}\n\n"
             f"Run `{run.uri}`, report written {now}."
             + (f" Exported model: `{export['export']}` (see its README.md)." if export else "") + "\n")
    sections = [title, eval_section(base, final), release_section(run),
                subspace_section(run), instructions_section(run), forget_section(run, cfg),
                timings_section(run)]
    if figs:
        sections.append("## Figures\n\n" + "\n\n".join(f"![{cap}]({name})\n\n*{cap}.*"
                                                        for name, (cap, _) in figs.items()) + "\n")
    for name, (_, data) in figs.items():
        run.write_bytes(f"report/{name}", data)
    run.write_text("report/report.md", "\n".join(sections))
    uri = f"{run.uri.rstrip('/')}/report/report.md"
    run.mark_done(STAGE, {"report": uri, "figures": sorted(figs), "seconds": round(time.perf_counter() - t0, 2)})
    return uri
