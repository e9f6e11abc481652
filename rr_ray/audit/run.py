"""``rr-ray audit RUN``: does the forgotten capability come back?

The run's unlearned model, its base and every method of a ``rr-ray compare`` in the same directory are
attacked side by side, each attack on each model as its own Ray task:

- relearning (``relearn-nN``): a LoRA fine-tuned for ``audit.relearn_steps`` steps on N forget-side examples
  (the task's external rows), on top of the model, then the forget score again;
- quantization (``rtn8`` ... ``gguf-q4_0``, ``quantize.py``): merged weights rounded to 8 or 4 bits, both sides;
- prompt probes (``roleplay``, ``prefix_injection``, ``paraphrase``, ``in_context``, ``probes.py``): the forget side asked in
  framings that often bring a suppressed skill back;
- where the edit lives (``locate.py``): the composed LoRA's size per layer and module, and its subspace
  similarity to each forget PEM.

Scores are on the test halves (``audit.limit`` items per metric). An attack's *recovery* is the share of the
removed forget score that returns, (s_attacked - s_unlearned) / (s_base - s_unlearned), and each attack
passes when its worst recovery stays at or below ``audit.max_recovery``. Every result is written as it
finishes under ``audit/``, so a rerun redoes only what was in flight; the table and plot go to ``report/``.
"""

from __future__ import annotations

import io
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

from rr_ray import cluster
from rr_ray.config import ConfigError, RRConfig, config_from_text
from rr_ray.storage import RunDir, localize

OUT = "audit"
PLAIN = "plain"


def audit_models(run: RunDir) -> dict[str, str | None]:
    """Model name -> composed adapter URI (None = the base): the run's release and any compared methods."""
    models: dict[str, str | None] = {"base": None}
    release = run.done_info("release")
    if release and release.get("composed_adapter"):
        models["unlearned"] = release["composed_adapter"]
    if run.exists("compare/table.json"):
        for name, info in run.read_json("compare/table.json")["methods"].items():
            # a method the compare reused from this run itself (compare.reuse) is "unlearned" already
            if info.get("adapter") and info["adapter"] not in models.values():
                models[name] = info["adapter"]
    if len(models) == 1:
        raise ConfigError(f"{run.uri}: nothing to audit (no finished release and no compare/table.json)")
    return models


def attacks(cfg: RRConfig) -> list[dict[str, Any]]:
    """Every attack the config asks for, with the sides it scores."""
    a = cfg.audit
    out: list[dict[str, Any]] = [{"id": PLAIN, "kind": PLAIN, "sides": ["forget", "utility"]}]
    out += [{"id": f"relearn-n{n}", "kind": "relearn", "examples": n, "sides": ["forget"]}
            for n in a.relearn_examples]
    out += [{"id": s, "kind": "quantize", "scheme": s, "sides": ["forget", "utility"]} for s in a.quant_schemes]
    out += [{"id": p, "kind": "probe", "probe": p, "sides": ["forget"]} for p in a.probes]
    return out


def _quantized_copy(model_dir: str, adapter: str | None, scheme: str, group: int, out: Path) -> dict[str, Any]:
    """Base + adapter merged in fp32, quantized (``quantize.py``) and saved as an HF model at ``out``."""
    from rr_ray.audit.quantize import quantize_linear_weights
    from rr_ray.models.loader import load_model, load_tokenizer
    from rr_ray.release.pem import Edit, EditLog, merge_into

    model = load_model(model_dir, "float32")
    if adapter:
        merge_into(model, EditLog(model_dir, (Edit(adapter, 1.0, "composed"),)))
    info = quantize_linear_weights(model, scheme, group)
    model.save_pretrained(str(out))
    load_tokenizer(model_dir).save_pretrained(str(out))
    return info


def _score(cfg_yaml: str, adapter_uri: str | None, attack: dict[str, Any]) -> dict[str, Any]:
    """Ray task: the attack's sides of one model (quantized or with framed prompts where the attack says)."""
    from rr_ray.audit.probes import probe_scorer
    from rr_ray.evaluation.evaluate import evaluate
    from rr_ray.evaluation.scoring import Scorer, scorer_spec
    from rr_ray.models.loader import resolve_model
    from rr_ray.tasks.base import get_task

    cfg = config_from_text(cfg_yaml, "run.yaml")
    adapter = str(localize(adapter_uri, endpoint_url=cfg.run.s3_endpoint_url)) if adapter_uri else None
    model_dir = str(resolve_model(cfg.model.name_or_path, cfg.model.cache_dir, cfg.run.s3_endpoint_url))
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rr-ray-audit-") as tmp:
        if attack["kind"] == "quantize":
            extra = _quantized_copy(model_dir, adapter, attack["scheme"], cfg.audit.quant_group, Path(tmp) / "q")
            model_dir, adapter = str(Path(tmp) / "q"), None
        scorer = Scorer.from_spec(model_dir, scorer_spec(cfg))
        if attack["kind"] == "probe":
            examples = None
            if attack["probe"] == "in_context":
                examples = get_task(cfg.task).external_forget_data(cfg.audit.in_context_examples)
            scorer = probe_scorer(attack["probe"], scorer, examples)
        result = evaluate(cfg, adapter=adapter, limit=cfg.audit.limit, scorer=scorer, sides=tuple(attack["sides"]))
    return result | {"attack": attack["id"], "adapter": adapter_uri, **extra}


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)  # a plugin method's 'package.module:Class' has a colon


def _relearn(cfg_yaml: str, adapter_uri: str | None, model: str, attack_id: str, examples: int) -> str:
    """Ray task: fine-tune a LoRA on ``examples`` forget-side rows on top of the model, compose it after the
    model's own edit into ``audit/<attack>/<model>/composed`` of the run, and return that URI."""
    from rr_ray.release.pem import Edit, EditLog, compose
    from rr_ray.release.train import train_pem
    from rr_ray.tasks.base import get_task

    cfg = config_from_text(cfg_yaml, "run.yaml")
    run = RunDir.open(cfg.run.dir, endpoint_url=cfg.run.s3_endpoint_url)
    where = f"{OUT}/{attack_id}/{_safe(model)}"
    rows = (get_task(cfg.task).external_forget_data(examples) or [])[:examples]
    if not rows:
        raise ValueError(f"audit relearn: task {cfg.task.name!r} has no external forget rows to relearn from")
    train = cfg.release.train
    per_epoch = math.ceil(len(rows) / (train.num_workers * train.batch_size))
    train = train.model_copy(update={"epochs": max(1, math.ceil(cfg.audit.relearn_steps / per_epoch)),
                                     "lr": cfg.audit.relearn_lr})
    with tempfile.TemporaryDirectory(prefix="rr-ray-relearn-") as tmp:
        res = train_pem(model_dir=cfg.model.name_or_path, rows=rows, out_dir=Path(tmp) / "adapter",
                        name=f"audit-{attack_id}-{_safe(model)}", storage_uri=f"{run.uri.rstrip('/')}/ray",
                        lora=cfg.release.lora, train=train, base_adapter=adapter_uri, dtype=cfg.model.dtype,
                        seed=cfg.run.seed, endpoint_url=cfg.run.s3_endpoint_url, cache_dir=cfg.model.cache_dir)
        edits = (Edit(str(res.adapter_dir), 1.0, "relearn"),)
        if adapter_uri:
            edits = (Edit(str(localize(adapter_uri, endpoint_url=cfg.run.s3_endpoint_url)), 1.0, "unlearned"), *edits)
        out = compose(EditLog(cfg.model.name_or_path, edits), Path(tmp) / "composed")
        run.upload_dir(out, f"{where}/composed")
        run.write_json(f"{where}/train.json", {"rows": len(rows), "epochs": train.epochs,
                                                         "steps": train.epochs * per_epoch, "losses": res.losses})
    return f"{run.uri.rstrip('/')}/{where}/composed"


def recovery(s_attacked: float, s_unlearned: float, s_base: float) -> float | None:
    """Share of the removed forget score that the attack brings back; None when nothing was removed."""
    removed = s_base - s_unlearned
    return (s_attacked - s_unlearned) / removed if removed > 0 else None


def score_slots(cfg: RRConfig, cluster: dict[str, float]) -> int:
    """How many scoring tasks may run while a relearning fine-tune waits: the cluster's CPUs (and GPUs, when
    both use them) less one trainer's worker group, per scoring task. Uncapped, the queued scoring tasks took
    every freed CPU and the trainer never started (2 CPUs: no fine-tune in 84 min, 25 scores done)."""
    gen, train = cfg.generation, cfg.release.train
    slots = (cluster.get("CPU", 0.0) - train.num_workers * train.cpus_per_worker) // gen.cpus_per_actor
    if gen.gpus_per_actor and train.use_gpu:
        slots = min(slots, (cluster.get("GPU", 0.0) - train.num_workers) // gen.gpus_per_actor)
    return max(0, int(slots))


def _collect(cfg: RRConfig, run: RunDir, models: dict[str, str | None], console: Console) -> dict[str, dict]:
    """Every (attack, model) result, from the run or from Ray tasks launched now; written as each finishes."""
    resources = {"num_cpus": cfg.generation.cpus_per_actor, "num_gpus": cfg.generation.gpus_per_actor}
    score = ray.remote(**resources)(_score)
    relearn = ray.remote(num_cpus=0)(_relearn)  # its Ray Train workers ask for the CPUs/GPUs
    results: dict[str, dict[str, Any]] = {}
    pending: dict[Any, tuple[str, str, str]] = {}  # ref -> (what, attack id, model)
    queued: list[tuple[str | None, str, str]] = []  # (adapter, attack id, model): scoring not yet submitted
    by_id = {a["id"]: a for a in attacks(cfg)}
    for attack in by_id.values():
        for name, adapter in models.items():
            rel = f"{OUT}/{attack['id']}/{_safe(name)}.json"
            if run.exists(rel):
                results.setdefault(attack["id"], {})[name] = run.read_json(rel)
            elif attack["kind"] == "relearn" and not (done := run.done_info(f"audit-{attack['id']}-{name}")):
                pending[relearn.remote(cfg.to_yaml(), adapter, name, attack["id"],
                                       attack["examples"])] = ("train", attack["id"], name)
            else:
                queued.append((done["adapter"] if attack["kind"] == "relearn" else adapter, attack["id"], name))
    total = len(pending) + len(queued)

    def submit() -> None:
        # While a fine-tune is pending, scoring takes only what one trainer's worker group leaves free.
        running = [what for what, *_ in pending.values()]
        free = score_slots(cfg, ray.cluster_resources()) - running.count("score") if "train" in running \
            else len(queued)
        for adapter, attack_id, name in queued[:max(0, free)]:
            pending[score.remote(cfg.to_yaml(), adapter, by_id[attack_id])] = ("score", attack_id, name)
        del queued[:max(0, free)]

    submit()
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        what, attack_id, name = pending.pop(ref)
        value = ray.get(ref)
        if what == "train":
            run.mark_done(f"audit-{attack_id}-{name}", {"adapter": value})
            queued.insert(0, (value, attack_id, name))
            console.print(f"audit: {attack_id}: {name} fine-tuned, scoring it")
        else:
            run.write_json(f"{OUT}/{attack_id}/{_safe(name)}.json", value)
            results.setdefault(attack_id, {})[name] = value
            console.print(f"audit: {attack_id} on {name} scored ({sum(len(v) for v in results.values())} "
                          f"results; {len(pending) + len(queued)} of {total} tasks left)")
        submit()
    return results


def _locate(cfg: RRConfig, run: RunDir, models: dict[str, str | None]) -> dict[str, Any]:
    from rr_ray.audit.locate import edit_norms, forget_similarity
    from rr_ray.models.loader import resolve_model

    endpoint = cfg.run.s3_endpoint_url
    model_dir = resolve_model(cfg.model.name_or_path, cfg.model.cache_dir, endpoint)
    out: dict[str, Any] = {"norms": {}, "similarity": {}}
    for name, adapter in models.items():
        if adapter:
            out["norms"][name] = edit_norms(localize(adapter, endpoint_url=endpoint), model_dir)
    if models.get("unlearned") and run.exists("edit_log.json"):
        forget = {e["step"]: str(localize(f"{run.uri.rstrip('/')}/{e['adapter']}", endpoint_url=endpoint))
                  for e in run.read_json("edit_log.json")["edits"] if e["kind"] == "forget"}
        if forget:
            out["similarity"] = forget_similarity(localize(models["unlearned"], endpoint_url=endpoint), forget,
                                                  cfg.audit.similarity_k)
    return out


def summarise(cfg: RRConfig, results: dict[str, dict[str, Any]], models: list[str]) -> dict[str, Any]:
    """Rows (attack x model: s, u, recovery) and one verdict per attack family and attacked model."""
    plain = results[PLAIN]
    s0 = plain["base"]["forget"]["s"]
    rows = []
    for attack in attacks(cfg):
        for name in models:
            r = results[attack["id"]][name]
            s = r["forget"]["s"]
            row = {"attack": attack["id"], "kind": attack["kind"], "model": name, "s": s,
                   "u": r.get("utility", {}).get("u"), "s_metric": r["forget"].get("s_metric", "proxy"),
                   "recovery": None}
            if name != "base" and attack["kind"] != PLAIN:
                row["recovery"] = recovery(s, plain[name]["forget"]["s"], s0)
            rows.append(row)
    verdicts = []
    families = {"relearn": [a["id"] for a in attacks(cfg) if a["kind"] == "relearn"],
                "quantize": cfg.audit.quant_schemes, "probe": cfg.audit.probes}
    groups = [(f"relearn ({i})", [i]) for i in families["relearn"]]
    groups += [(kind, ids) for kind, ids in (("quantize", families["quantize"]), ("probe", families["probe"])) if ids]
    for label, ids in groups:
        for name in models:
            if name == "base":
                continue
            values = [r["recovery"] for r in rows if r["model"] == name and r["attack"] in ids]
            known = [v for v in values if v is not None]
            worst = max(known) if known else None
            worst_at = ids[values.index(worst)] if worst is not None else None
            verdict = "n/a" if worst is None else ("PASS" if worst <= cfg.audit.max_recovery else "FAIL")
            verdicts.append({"attack": label, "model": name, "worst_recovery": worst, "worst_at": worst_at,
                             "verdict": verdict, "threshold": cfg.audit.max_recovery})
    return {"rows": rows, "verdicts": verdicts, "s_base": s0}


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.0f} %" if pct else f"{v:.4g}"


def table_markdown(summary: dict[str, Any], models: list[str]) -> str:
    head = "| attack | " + " | ".join(f"{m}: s | {m}: u" + (f" | {m}: recovery" if m != "base" else "")
                                     for m in models) + " |"
    cols = sum(3 if m != "base" else 2 for m in models)
    lines = [head, "|---|" + "---:|" * cols]
    by = {(r["attack"], r["model"]): r for r in summary["rows"]}
    for attack in dict.fromkeys(r["attack"] for r in summary["rows"]):
        cells = []
        for m in models:
            r = by[(attack, m)]
            cells += [_fmt(r["s"]), _fmt(r["u"])] + ([_fmt(r["recovery"], pct=True)] if m != "base" else [])
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    out = []
    for v in summary["verdicts"]:
        worst = "nothing was removed, so nothing can return" if v["worst_recovery"] is None else (
            f"worst recovery {100 * v['worst_recovery']:.0f} % ({v['worst_at']}) vs at most "
            f"{100 * v['threshold']:.0f} %")
        out.append(f"{v['verdict']}: {v['attack']} on {v['model']}: {worst}")
    return out


def plot_png(summary: dict[str, Any], located: dict[str, Any], models: list[str]) -> bytes:
    """Left: forget score under each attack per model. Right: the unlearned edit's size per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rr_ray.audit.locate import per_layer

    ids = list(dict.fromkeys(r["attack"] for r in summary["rows"]))
    by = {(r["attack"], r["model"]): r["s"] for r in summary["rows"]}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        ax.bar([x + i * width for x in range(len(ids))], [by[(a, m)] for a in ids], width, label=m)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(ids))], ids, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"forget score s ({summary['rows'][0]['s_metric']}; lower = forgotten)")
    ax.set_title("Forget score under each attack", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    target = "unlearned" if "unlearned" in located["norms"] else next(iter(located["norms"]), None)
    if target:
        key = "relative" if any("relative" in r for r in located["norms"][target]) else "norm"
        for kind, pts in per_layer(located["norms"][target], key).items():
            bx.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=kind)
        bx.set_xlabel("layer")
        bx.set_ylabel("||dW||_F / ||W||_F" if key == "relative" else "||dW||_F")
        bx.set_title(f"Where the edit lives ({target})", fontsize=10)
        bx.legend(fontsize=8)
        bx.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _located_markdown(located: dict[str, Any]) -> str:
    parts = []
    for name, rows in located["norms"].items():
        total = math.sqrt(sum(r["norm"] ** 2 for r in rows))
        top = sorted(rows, key=lambda r: -r.get("relative", r["norm"]))[:5]
        parts.append(f"- {name}: ||dW||_F over all {len(rows)} modules {total:.4g}; largest: " + ", ".join(
            f"{r['module']} {r.get('relative', r['norm']):.3g}" for r in top))
    for step, s in located["similarity"].items():
        parts.append(f"- final edit vs forget PEM {step}: Sim {s['sim_mean']:.4f} ± {s['sim_std']:.4f} "
                     f"(normalised {s['normalised_mean']:.4f}) over {s['modules']} modules")
    return "\n".join(parts) + "\n"


def run_audit(cfg: RRConfig, run: RunDir, console: Console | None = None) -> dict[str, Any]:
    """Attack every model of the run, write ``audit/`` and ``report/audit.md`` + ``report/audit.png``."""
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    models = audit_models(run)
    cfg = config_from_text(cfg.to_yaml(), "audit", [f"run.dir={run.uri}"])
    address = cluster.connect(cfg.ray)
    console.rule(f"[bold]audit[/]: {', '.join(models)} under {len(attacks(cfg))} attacks")
    results = _collect(cfg, run, models, console)
    located = _locate(cfg, run, models)
    names = list(models)
    summary = summarise(cfg, results, names)
    lines = verdict_lines(summary)
    table = table_markdown(summary, names)
    metric = summary["rows"][0]["s_metric"]
    md = (f"# Audit: does the forgotten capability come back?\n\n{cfg.task.name}, {cfg.model.name_or_path}; "
          f"s = {metric} on {cfg.audit.limit or 'all'} test-half items per metric; recovery = share of the removed "
          f"forget score that returns.\n\n{table}\n" + "\n".join(f"- {line}" for line in lines) +
          f"\n\n## Where the edit lives\n\n{_located_markdown(located)}\n![audit](audit.png)\n")
    run.write_json(f"{OUT}/audit.json", {"summary": summary, "located": located, "models": models})
    run.write_text(f"{OUT}/table.md", table)
    run.write_text("report/audit.md", md)
    run.write_bytes("report/audit.png", plot_png(summary, located, names))
    rich = Table(title=f"audit: {cfg.task.name}, s = {metric}")
    rich.add_column("attack")
    for m in names:
        rich.add_column(f"{m} s", justify="right")
        if m != "base":
            rich.add_column(f"{m} rec.", justify="right")
    by = {(r["attack"], r["model"]): r for r in summary["rows"]}
    for attack in dict.fromkeys(r["attack"] for r in summary["rows"]):
        cells = []
        for m in names:
            cells.append(_fmt(by[(attack, m)]["s"]))
            if m != "base":
                cells.append(_fmt(by[(attack, m)]["recovery"], pct=True))
        rich.add_row(attack, *cells)
    console.print(rich)
    for line in lines:
        console.print(line)
    out = {"run_dir": run.uri, "ray": address, "models": names, "verdicts": summary["verdicts"],
           "report": f"{run.uri.rstrip('/')}/report/audit.md", "wall_s": round(time.perf_counter() - t0, 1)}
    run.mark_done(OUT, out)
    return out
