"""``rr-ray compare CONFIG``: unlearning methods side by side on the same held-out sets (paper Tables 2-4).

Each method in ``compare.methods`` runs in its own run directory, ``<run.dir>/methods/<name>/`` (resumable
there, as ``rr-ray run`` is), inside its own Ray task, so independent methods run in parallel where the cluster
has room. Then the base model and every method's edit are evaluated on the task's test halves (the items no
method chose a weight on; evaluation parts in parallel too), and ``compare/`` gets the table (markdown and
JSON), a forget-vs-utility scatter (PNG) and each method's wall time.
"""

from __future__ import annotations

import io
import re
import time
from typing import Any

import ray
from rich.table import Table

from rr_ray import cluster
from rr_ray import matched_forget
from rr_ray.config import RRConfig, config_from_text
from rr_ray.pipeline import console, evaluate_models, open_run
from rr_ray.storage import RunDir
from rr_ray.tasks.base import SIDES, exact_metric

OUT = "compare"


def method_dir(root: RunDir, name: str, reuse: dict[str, str] | None = None) -> str:
    """``<root>/methods/<name>``, the name made path-safe (a plugin's 'package.module:Class' has a colon), or
    the directory ``compare.reuse`` names for it."""
    if reuse and name in reuse:
        return reuse[name]
    safe = re.sub(r"[^\w.-]", "_", name)
    return f"{root.uri.rstrip('/')}/methods/{safe}"


def entries(cfg: RRConfig) -> dict[str, tuple[str, list[str]]]:
    """Table row name -> (method, extra overrides): every method, then every ablation of reveal_release."""
    out = {name: (name, []) for name in cfg.compare.methods}
    out |= {name: ("reveal_release", cfg.compare.ablation_overrides(name)) for name in cfg.compare.variants()}
    return out


def _revealed(cfg: RRConfig, root: RunDir) -> str | None:
    """The forget set the ablations release from, once reveal_release has it: they vary only release settings,
    so they share its reveal output (the same data, and no second reveal) instead of revealing again."""
    if cfg.release.forget_path:
        return cfg.release.forget_path
    ours = RunDir.open(method_dir(root, "reveal_release", cfg.compare.reuse), endpoint_url=cfg.run.s3_endpoint_url)
    return f"{ours.uri.rstrip('/')}/reveal/forget.jsonl" if ours.is_done("reveal") else None


def method_config(cfg: RRConfig, root: RunDir, name: str, overrides: list[str] = ()) -> RRConfig:
    """The config a method runs with: the compare config (plus an ablation's overrides), in the method's own
    run directory."""
    return config_from_text(cfg.to_yaml(), "compare",
                            [f"run.dir={method_dir(root, name, cfg.compare.reuse)}", *overrides])


def _run_method(cfg_yaml: str, name: str, method: str) -> dict[str, Any]:
    """Ray task: one method in its run directory; returns its adapter URI, info and wall time."""
    from rr_ray.methods.base import get_method

    cfg = config_from_text(cfg_yaml, f"compare ({name})")
    started = time.time()
    run = open_run(cfg)
    result = get_method(method).run(cfg, run)
    finished = time.time()
    return {"method": name, "adapter": result.adapter, "info": result.info, "run_dir": run.uri,
            "seconds": round(finished - started, 1), "started": started, "finished": finished}


def _row(name: str, result: dict[str, Any], base: dict[str, Any], seconds: float | None,
         exact: dict[str, str | None]) -> dict[str, Any]:
    """One method's table row; ``exact``: side -> the task's exact metric key (None: the task has none)."""
    f, u = result["forget"], result["utility"]
    row = {"method": name, "s": f["s"], "u": u["u"], "s_metric": f.get("s_metric", "proxy"),
           "u_metric": u.get("u_metric", "proxy"), "s_proxy": f.get("s_proxy", f["s"]),
           "u_proxy": u.get("u_proxy", u["u"]), "seconds": seconds,
           "forget_items": next((v for k, v in f.items() if k.endswith(("_problems", "_items"))), None),
           "utility_items": next((v for k, v in u.items() if k.endswith(("_problems", "_items"))), None)}
    # The task's exact metrics (e.g. pass@1, GSM8K accuracy) are shown whichever score s / u steer on.
    for key, side, out in (("s", "forget", f), ("u", "utility", u)):
        if (metric := exact.get(side)) is not None and metric in out:
            row[f"{key}_exact"], row[f"{key}_exact_name"] = float(out[metric]), metric
    s0, u0 = base["forget"]["s"], base["utility"]["u"]
    row["forget_drop"] = 1 - row["s"] / s0 if s0 else None
    row["utility_kept"] = row["u"] / u0 if u0 else None
    return row


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _secs(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


def _columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the methods table, shared by its markdown and console forms: per side the exact
    metric (where the task has one) and the proxy, and the drop / kept share of the score the rules steered on."""
    first = rows[0]
    heads, cells = ["method"], [[r["method"]] for r in rows]
    for key, side, change, fmt in (("s", "forget", "drop", lambda r: _pct(r["forget_drop"])),
                                   ("u", "utility", "kept", lambda r: _pct(r["utility_kept"]))):
        if f"{key}_exact_name" in first:
            heads.append(f"{side}: {first[f'{key}_exact_name']}")
            for c, r in zip(cells, rows):
                c.append(f"{r[f'{key}_exact']:.4g}" if f"{key}_exact" in r else "—")
        heads += [f"{side}: proxy", f"{side} {change} ({first[f'{key}_metric']})"]
        for c, r in zip(cells, rows):
            c += [f"{r[f'{key}_proxy']:.4g}", fmt(r)]
    heads.append("wall s")
    for c, r in zip(cells, rows):
        c.append(_secs(r["seconds"]))
    return heads, cells


def table_markdown(rows: list[dict[str, Any]]) -> str:
    heads, cells = _columns(rows)
    lines = ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines) + "\n"


def table_rich(rows: list[dict[str, Any]], title: str) -> Table:
    heads, cells = _columns(rows)
    table = Table(title=title)
    for col in heads:
        table.add_column(col, justify="left" if col == "method" else "right")
    for c in cells:
        table.add_row(*c)
    return table


def log_scaled(values: list[float]) -> bool:
    """Whether a scatter axis is drawn in log scale: every value positive and spanning over 10x (linear would
    pile the well-forgetting methods onto one point near 0)."""
    return min(values) > 0 and max(values) > 10 * min(values)


def scatter_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """Forget score (lower is better) against utility (higher is better), one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for r in rows:
        base = r["method"] == "base"
        ax.scatter(r["s"], r["u"], s=60, marker="s" if base else "o", color="tab:gray" if base else None,
                   label=r["method"], zorder=3)
    # Methods that forget well sit near s = 0 and their point labels overlapped: a legend names the points.
    if log_scaled([r["s"] for r in rows]):
        ax.set_xscale("log")
    if log_scaled([r["u"] for r in rows]):
        ax.set_yscale("log")
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    ax.set_xlabel(f"forget: {rows[0]['s_metric']} (lower = more forgotten)")
    ax.set_ylabel(f"utility: {rows[0]['u_metric']} (higher = kept)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


ABLATION_TITLES = {"forget_rule_60": "the 60 % forget rule against the 90 % one (Figure 4 shape)",
                   "orthogonal_retain": "retain PEMs with and without O-LoRA's orthogonality penalty (Table 10 shape)"}


def ablations_markdown(steps: dict[str, list[dict[str, Any]]], rows: dict[str, dict[str, Any]], title: str) -> str:
    """Per ablation: its release steps beside reveal_release's (weight, s / s_base, u / u_base on the
    validation halves) and both models on the test halves."""
    from rr_ray.release.loop import step_label

    def cells(history: list[dict[str, Any]], i: int) -> str:
        if i >= len(history):
            return "| | | "
        rec, s0, u0 = history[i], history[0]["s"], history[0]["u"]
        return f"| {step_label(rec)} | {rec['s'] / s0:.3f} | {rec['u'] / u0:.3f} "

    out = [f"# Ablations of reveal_release: {title}\n"]
    ours = steps["reveal_release"]
    for name, history in steps.items():
        if name == "reveal_release":
            continue
        out += [f"## {name}: {ABLATION_TITLES[name]}\n",
                "| # | reveal_release | s / s_base | u / u_base | " + name + " | s / s_base | u / u_base |",
                "|---:|---|---:|---:|---|---:|---:|"]
        for i in range(max(len(ours), len(history))):
            out.append(f"| {i} " + cells(ours, i) + cells(history, i) + "|")
        a, b = rows["reveal_release"], rows[name]
        out.append(f"\nTest halves: reveal_release forget {a['s']:.4g} ({_pct(a['forget_drop'])} drop), utility "
                   f"{a['u']:.4g} ({_pct(a['utility_kept'])} kept); {name} forget {b['s']:.4g} "
                   f"({_pct(b['forget_drop'])} drop), utility {b['u']:.4g} ({_pct(b['utility_kept'])} kept).\n")
    return "\n".join(out) + "\n"


def ablations_png(steps: dict[str, list[dict[str, Any]]], title: str) -> bytes:
    """s / s_base and u / u_base across the release steps, one line per variant (validation halves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for name, history in steps.items():
        s0, u0 = history[0]["s"], history[0]["u"]
        xs = [rec["index"] for rec in history]
        axes[0].plot(xs, [rec["s"] / s0 for rec in history], "o-", label=name)
        axes[1].plot(xs, [rec["u"] / u0 for rec in history], "o-", label=name)
    for ax, what in zip(axes, ("forget s / s_base (lower = forgotten)", "utility u / u_base (higher = kept)")):
        ax.set_xlabel("release step")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Ablations: {title}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def matched_markdown(target: float, points: list[matched_forget.MatchedPoint], rows: dict[str, dict[str, Any]],
             data_sizes: dict[str, int | None], title: str) -> str:
    """The Tables 5-6 shaped table; ``rows``: side -> the compare row of its matched edit on the test halves."""
    lines = [f"# Internal vs external forget data at matched forget quality: {title}\n",
             f"Matched on the validation halves at s / s_base = {target:.3f}, the deepest forget level both mu_0 "
             "sweeps reach; each weight is interpolated between its two bracketing sweep points, then the edit is "
             "measured on the test halves." + (" No sweep point of one side lowered s: both are matched at no "
                                                 "forgetting, so this table says nothing here." if target >= 1 else "")
             + "\n"]
    heads, cells = _columns([rows[p.side] for p in points])  # minus method and wall s: the scores only
    lines += ["| forget data | rows | weight on mu_0 | between | " + " | ".join(heads[1:-1]) + " |",
              "|---|---:|---:|---|" + "---:|" * (len(heads) - 2)]
    for p, c in zip(points, cells):
        lines.append(f"| {p.side} ({matched_forget.SIDES[p.side]}) | {data_sizes.get(p.side) or '—'} | "
                     f"{p.coef:+.3g} | {p.bracket[0]:+g} .. {p.bracket[1]:+g} | " + " | ".join(c[1:-1]) + " |")
    return "\n".join(lines) + "\n"


def _matched_edits(cfg: RRConfig, root: RunDir
                   ) -> tuple[float, list[matched_forget.MatchedPoint], dict[str, str]]:
    """Tables 5-6: the internal (reveal_release) and external (pem_external) mu_0 PEMs, each at the weight that
    reaches the common forget level on the validation halves, composed in its method's run directory.
    Returns the target, the matched points and model name -> adapter URI for the test-half evaluation."""
    from rr_ray.release.loop import single_edit

    runs = {side: RunDir.open(method_dir(root, method, cfg.compare.reuse), endpoint_url=cfg.run.s3_endpoint_url)
            for side, method in matched_forget.SIDES.items()}
    target, points = matched_forget.matched_points(runs)
    edits, rel = {}, f"release/{matched_forget.STEP}/matched"
    for p in points:
        edits[f"{p.side}_matched"] = single_edit(cfg, runs[p.side], matched_forget.STEP, p.coef, "forget", rel)
        console.print(f"compare: {p.side} forget data, mu_0 weight {p.coef:+.3g} for s / s_base = {target:.3f}")
    return target, points, edits


def _reuse_evaluations(cfg: RRConfig, root: RunDir) -> None:
    """A reused run's own evaluate stage (eval/final.json, eval/base.json) as the method's and the base's rows:
    its config matched the compare config in every field that changes results (``open_run`` checked it when
    the method ran there), so they are the same models on the same test-half items."""
    for name, uri in cfg.compare.reuse.items():
        run = RunDir.open(uri, endpoint_url=cfg.run.s3_endpoint_url)
        for ours, theirs in ((name, "final"), ("base", "base")):
            if not root.exists(f"{OUT}/eval/{ours}.json") and run.exists(f"eval/{theirs}.json"):
                root.write_json(f"{OUT}/eval/{ours}.json", run.read_json(f"eval/{theirs}.json"))
                console.print(f"compare: {ours} evaluation taken from {uri}/eval/{theirs}.json")


def run_compare(cfg: RRConfig) -> dict[str, Any]:
    """Run every method of ``cfg.compare.methods`` (in parallel Ray tasks), evaluate them and the base on the
    test halves, and write ``compare/``. Finished methods and evaluation parts are skipped on a rerun."""
    t0 = time.perf_counter()
    root = open_run(cfg)
    address = cluster.connect(cfg.ray)
    # num_cpus=0: the task only drives its method; the actors, trainers and trials it starts ask for resources.
    runner = ray.remote(num_cpus=0, max_retries=0)(_run_method)
    done: dict[str, dict[str, Any]] = {}
    pending, held = {}, {}
    runs = entries(cfg)
    for name, (method, overrides) in runs.items():
        if (info := root.done_info(f"compare-{name}")) is not None:
            console.print(f"compare: {name} already done, skipped")
            done[name] = info
        elif name in cfg.compare.variants():
            held[name] = overrides
        else:
            console.print(f"compare: running {name} in {method_dir(root, name, cfg.compare.reuse)}")
            pending[runner.remote(method_config(cfg, root, name, overrides).to_yaml(), name, method)] = name
    while pending or held:
        if held and (forget := _revealed(cfg, root)) is not None:
            for name, overrides in held.items():
                console.print(f"compare: running {name} in {method_dir(root, name, cfg.compare.reuse)} on "
                              f"reveal_release's forget set")
                extra = [] if cfg.release.forget_path else [f"release.forget_path={forget}"]
                pending[runner.remote(method_config(cfg, root, name, [*overrides, *extra]).to_yaml(), name,
                                      "reveal_release")] = name
            held = {}
        if not pending:
            raise RuntimeError("compare: reveal_release finished without a reveal/forget.jsonl for its ablations")
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0 if held else None)
        for ref in ready:
            name = pending.pop(ref)
            done[name] = ray.get(ref)
            root.mark_done(f"compare-{name}", done[name])
            console.print(f"compare: {name} finished in {done[name]['seconds']:.0f} s")
    console.rule("[bold]compare[/]: every method and the base on the same test halves")
    models = {"base": None, **{name: done[name]["adapter"] for name in runs}}
    _reuse_evaluations(cfg, root)
    matched = _matched_edits(cfg, root) if "internal_vs_external" in cfg.compare.ablations else None
    results = evaluate_models(cfg, root, models | (matched[2] if matched else {}), prefix=f"{OUT}/eval")
    exact = {side: exact_metric(cfg.task, side) for side in SIDES}
    rows = [_row(name, results[name], results["base"], None if name == "base" else done[name]["seconds"], exact)
            for name in models]
    title = f"{cfg.task.name}: {cfg.model.name_or_path}, test halves"
    table = table_markdown(rows)
    root.write_text(f"{OUT}/table.md", f"# Methods compared: {title}\n\n{table}")
    root.write_json(f"{OUT}/table.json", {"rows": rows, "methods": done})
    root.write_bytes(f"{OUT}/scatter.png", scatter_png(rows, title))
    console.print(table_rich(rows, title))
    if matched:
        target, points, edits = matched
        sides = {p.side: _row(p.side, results[name], results["base"], None, exact) for p, name in zip(points, edits)}
        sizes = {side: done[method]["info"].get("forget_rows") for side, method in matched_forget.SIDES.items()}
        text = matched_markdown(target, points, sides, sizes, title)
        root.write_text(f"{OUT}/internal_vs_external.md", text)
        root.write_json(f"{OUT}/internal_vs_external.json", {**matched_forget.to_json(target, points), "rows": sides})
        console.print(text)
    if cfg.compare.variants():
        steps = {name: RunDir.open(method_dir(root, name, cfg.compare.reuse), endpoint_url=cfg.run.s3_endpoint_url)
                 .read_json("release/steps.json") for name in ("reveal_release", *cfg.compare.variants())}
        ablations = ablations_markdown(steps, {r["method"]: r for r in rows}, title)
        root.write_text(f"{OUT}/ablations.md", ablations)
        root.write_bytes(f"{OUT}/ablations.png", ablations_png(steps, title))
        console.print(ablations)
    summary = {"run_dir": root.uri, "ray": address, "rows": rows, "table": f"{root.uri.rstrip('/')}/{OUT}/table.md",
               "wall_s": round(time.perf_counter() - t0, 1)}
    root.mark_done(OUT, {k: v for k, v in summary.items() if k != "rows"})
    return summary
