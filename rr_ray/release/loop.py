"""The Release stage: iterative PEM composition, paper equation 1.

    Phi = Phi_0 - mu_0 dPhi_forget^(0) + sum_{i=1..l} (lambda_i dPhi_retain^(i) - mu_i dPhi_forget^(i))

Steps run in that order (mu_0, lambda_1, mu_1, ..., lambda_l, mu_l). Each step trains its PEM on the
current composed model (Ray Train), sweeps its coefficient (Ray Tune) and applies the one the threshold
rule picks. After every step the run directory holds the PEM, the composed model so far, the trials, the
decision and ``edit_log.json``; a rerun skips finished steps and resumes the unfinished one.

Rule references (section 3.2, "compared to the beginning of the current iteration"): mu_i is judged against
the model just before it, and so is lambda_i by default (``rules.retain_reference``; ``before_forget`` judges it
against the utility before the preceding forget step instead). Which accepted weight wins, what a rejected step
applies, and grid refinement are ``release.rules`` / ``release.refine_rounds`` (see ``rules.py``).
``release.iterations`` is the most iterations; ``forget_target`` / ``utility_floor`` end the release earlier.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rr_ray.config import RRConfig, RulesConfig
from rr_ray.evaluation.scoring import scorer_spec
from rr_ray.release.pem import Edit, EditLog, compose
from rr_ray.release.rules import Candidate, Decision, choose_forget, choose_retain, refine_points
from rr_ray.release.search import sweep
from rr_ray.release.train import train_pem
from rr_ray.storage import RunDir, localize
from rr_ray.tasks.base import get_task

EDIT_LOG = "edit_log.json"
FINAL_ADAPTER = "release/composed"


def plan(iterations: int) -> list[tuple[str, str]]:
    """(step name, kind) in the order of equation 1."""
    steps = [("mu_0", "forget")]
    for i in range(1, iterations + 1):
        steps += [(f"lambda_{i}", "retain"), (f"mu_{i}", "forget")]
    return steps


def load_forget_rows(cfg: RRConfig, run: RunDir) -> list[dict[str, str]]:
    """The forget set: ``release.forget_path`` if given, else the run's Reveal output."""
    if cfg.release.forget_path:
        source = cfg.release.forget_path
        # A local path or an s3:// URI (an ablation in `rr-ray compare` reads reveal_release's reveal output).
        parent, _, name = source.rstrip("/").rpartition("/")
        folder = RunDir.open(parent or ".", endpoint_url=cfg.run.s3_endpoint_url)
        if not name or not folder.exists(name):
            raise FileNotFoundError(f"release.forget_path: {source}: no such file")
        rows = folder.read_jsonl(name)
    elif run.exists("reveal/forget.jsonl"):
        rows, source = run.read_jsonl("reveal/forget.jsonl"), f"{run.uri}/reveal/forget.jsonl"
    else:
        raise FileNotFoundError(f"{run.uri}: no reveal/forget.jsonl; run `rr-ray reveal` first or set "
                                "release.forget_path")
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or not r.get("prompt") or not r.get("response")]
    if bad or not rows:
        raise ValueError(f"{source}: {'no rows' if not rows else f'row {bad[0] + 1} lacks prompt/response'}")
    if cfg.release.forget_rows is not None:  # keep the most relevant rows (a stable sort keeps file order on ties)
        rows = sorted(rows, key=lambda r: -float(r.get("relevance", 1.0)))[: cfg.release.forget_rows]
    if cfg.release.forget_prompt == "bare":
        if any(not r.get("context") for r in rows):
            raise ValueError(f"{source}: release.forget_prompt=bare needs each row's context (Reveal writes it)")
        return [{"prompt": r["context"], "response": r["response"]} for r in rows]
    return [{"prompt": r["prompt"], "response": r["response"]} for r in rows]


def _uri(run: RunDir, rel: str) -> str:
    return f"{run.uri.rstrip('/')}/{rel}"


def local_log(log: EditLog, run: RunDir, endpoint_url: str | None) -> EditLog:
    """The edit log with its run-relative adapter paths replaced by local directories."""
    edits = tuple(Edit(str(localize(_uri(run, e.adapter), endpoint_url=endpoint_url)), e.coef, e.kind, e.step)
                  for e in log.edits)
    return EditLog(log.base, edits)


def _compose_to_run(log: EditLog, run: RunDir, rel: str, endpoint_url: str | None) -> str | None:
    """Compose ``log`` into one LoRA stored at ``rel`` in the run; returns its URI (None for an empty log)."""
    with tempfile.TemporaryDirectory(prefix="rr-ray-compose-") as tmp:
        out = compose(local_log(log, run, endpoint_url), Path(tmp) / "composed")
        if out is None:
            return None
        run.upload_dir(out, rel)
    return _uri(run, rel)


def train_step(cfg: RRConfig, run: RunDir, step: str, rows: list[dict[str, str]], current: str | None,
               **train_kw: Any) -> dict:
    """Train the PEM of ``step`` on ``rows`` (on top of ``current``) into release/<step>/adapter, once.
    ``train_kw``: ``train_pem``'s objective, objective_args or loop (the baselines' training)."""
    rel = f"release/{step}/adapter"
    if run.is_done(f"release-{step}-train"):
        return run.done_info(f"release-{step}-train") or {}
    with tempfile.TemporaryDirectory(prefix="rr-ray-pem-") as tmp:
        res = train_pem(model_dir=cfg.model.name_or_path, rows=rows, out_dir=Path(tmp) / "adapter",
                        name=f"train-{step}", storage_uri=_uri(run, "ray"), lora=cfg.release.lora,
                        train=cfg.release.train, base_adapter=current, dtype=cfg.model.dtype, seed=cfg.run.seed,
                        endpoint_url=cfg.run.s3_endpoint_url, cache_dir=cfg.model.cache_dir, **train_kw)
        run.upload_dir(res.adapter_dir, rel)
    info = {"rows": len(rows), "epochs": res.steps, "losses": res.losses, "attempts": res.attempts,
            "seconds": round(res.seconds, 1)}
    run.mark_done(f"release-{step}-train", info)
    return info


def _sweep(cfg: RRConfig, run: RunDir, step: str, kind: str, current: str | None, coefs: list[float],
           name: str) -> tuple[list[dict[str, Any]], float, bool]:
    result = sweep(model=cfg.model.name_or_path, current=current, adapter=_uri(run, f"release/{step}/adapter"),
                   kind=kind, step=step, coefs=coefs, task_cfg=cfg.task, limit=cfg.release.eval_limit,
                   storage_uri=_uri(run, "ray"), name=name, scorer=scorer_spec(cfg),
                   cpus_per_trial=cfg.release.cpus_per_trial, gpus_per_trial=cfg.release.gpus_per_trial,
                   endpoint_url=cfg.run.s3_endpoint_url, cache_dir=cfg.model.cache_dir)
    return result.trials, result.seconds, result.restored


def _decide(kind: str, ref: dict[str, float], trials: list[dict[str, Any]], rules: RulesConfig) -> Decision:
    candidates = [Candidate(t["coef"], t["s"], t["u"]) for t in trials]
    if kind == "forget":
        return choose_forget(ref["s"], ref["u"], candidates, rules)
    return choose_retain(ref["s"], ref["u"], candidates, rules)


def run_step(cfg: RRConfig, run: RunDir, index: int, step: str, kind: str, log: EditLog,
             history: list[dict[str, Any]], rows: list[dict[str, str]], console: Console) -> tuple[EditLog, dict]:
    """Train, sweep (and refine) and apply one step; returns the new edit log and the step's record.

    A step whose rule no candidate meets applies weight 0 (the record keeps the rejected best candidate); with
    ``rules.on_reject: stop`` the caller ends the release after it.
    """
    t0 = time.perf_counter()
    rules = cfg.release.rules
    current = _uri(run, f"release/{history[-1]['step']}/composed") if log.edits else None
    console.print(f"[bold]release {step}[/]: training the {kind} PEM on {len(rows)} rows "
                  f"({cfg.release.train.num_workers} Ray Train worker(s), {cfg.release.train.strategy})")
    extra: dict[str, Any] = {}
    if kind == "retain" and cfg.release.orthogonality > 0:
        extra = {"orthogonality": cfg.release.orthogonality,
                 "orthogonal_to": [_uri(run, e.adapter) for e in log.edits if e.kind == "forget"]}
    train_info = train_step(cfg, run, step, rows, current, **extra)
    t1 = time.perf_counter()
    weights = cfg.release.forget_weights if kind == "forget" else cfg.release.retain_weights
    coefs = [-w for w in weights] if kind == "forget" else list(weights)
    if not history:
        coefs.append(0.0)  # the first sweep also scores the base model, on the same data
    console.print(f"release {step}: sweeping {len(coefs)} coefficients with Ray Tune")
    trials, sweep_s, restored = _sweep(cfg, run, step, kind, current, coefs, f"tune-{step}")
    if not history:
        base = next(t for t in trials if t["coef"] == 0.0)
        history.append({"index": 0, "step": "base", "kind": "base", "coef": 0.0, "s": base["s"], "u": base["u"]})
        run.write_json("release/base.json", {"s": base["s"], "u": base["u"]})
        trials = [t for t in trials if t["coef"] != 0.0]
    prev = history[-1]
    ref = {"s": prev["s"], "u": prev["u"]}
    if kind == "retain" and rules.retain_reference == "before_forget":
        ref["u"] = history[-2]["u"]
    decision = _decide(kind, ref, trials, rules)
    for r in range(1, cfg.release.refine_rounds + 1):
        scored = {t["coef"] for t in trials}
        points = [c for c in refine_points(kind, [Candidate(t["coef"], t["s"], t["u"]) for t in trials], decision,
                                           ref["s"], rules) if c not in scored]
        if not points:
            break
        console.print(f"release {step}: refinement {r}: scoring {', '.join(f'{c:+g}' for c in points)}")
        more, more_s, more_restored = _sweep(cfg, run, step, kind, current, points, f"tune-{step}-r{r}")
        trials = sorted(trials + more, key=lambda t: (abs(t["coef"]), t["coef"]))
        sweep_s, restored = sweep_s + more_s, restored or more_restored
        decision = _decide(kind, ref, trials, rules)
    run.write_jsonl(f"release/{step}/trials.jsonl", trials)
    if decision.accepted:
        applied = decision.coef
        chosen = next(t for t in trials if t["coef"] == applied)
        log = log.then(Edit(adapter=f"release/{step}/adapter", coef=applied, kind=kind, step=step))
    else:  # never bake in an edit its rule rejected
        applied, chosen = 0.0, {"s": prev["s"], "u": prev["u"]}
    _compose_to_run(log, run, f"release/{step}/composed", cfg.run.s3_endpoint_url)
    record = {"index": index, "step": step, "kind": kind, "coef": applied, "accepted": decision.accepted,
              "best_candidate": decision.coef, "reason": decision.reason, "s": chosen["s"], "u": chosen["u"],
              "reference": ref, "trials": trials, "train": train_info, "sweep_restored": restored,
              "seconds": {"train": round(t1 - t0, 1), "sweep": round(sweep_s, 1),
                          "total": round(time.perf_counter() - t0, 1)}}
    run.write_json(f"release/{step}/step.json", record)
    run.write_json(EDIT_LOG, log.to_json())
    run.mark_done(f"release-{step}", {"coef": applied, "accepted": decision.accepted})
    if decision.accepted:
        console.print(f"release {step}: coefficient {applied:+g} accepted: s {chosen['s']:.4g}, u {chosen['u']:.4g} "
                      f"({decision.reason})")
    else:
        then = "release stops here" if rules.on_reject == "stop" else "weight 0 applied"
        console.print(f"[yellow]release {step}: no weight met the rule, {then}[/] ({decision.reason})")
    return log, record


def step_label(rec: dict[str, Any]) -> str:
    """Tables 7-9 row label: "Base model", "-mu_0 = -2", "+lambda_1 = +0.3"."""
    if rec["kind"] == "base":
        return "Base model"
    name, i = rec["step"].split("_")
    return f"{'-' if rec['kind'] == 'forget' else '+'}{name}_{i} = {rec['coef']:+g}"


def _rule_text(rec: dict[str, Any]) -> str:
    if rec["kind"] == "base":
        return ""
    if rec["accepted"]:
        return "accepted"
    return f"none met: 0 applied (best {rec.get('best_candidate', rec['coef']):+g})"


def steps_table(history: list[dict[str, Any]], title: str = "release steps") -> Table:
    table = Table(title=title)
    for col in ("step", "weight applied", "s (forget)", "u (utility)", "s / s_base", "u / u_base", "rule"):
        table.add_column(col, justify="left" if col in ("weight applied", "rule") else "right")
    s0, u0 = history[0]["s"], history[0]["u"]
    for rec in history:
        rule = _rule_text(rec)
        table.add_row(str(rec["index"]), step_label(rec), f"{rec['s']:.4g}", f"{rec['u']:.4g}",
                      f"{rec['s'] / s0:.3f}", f"{rec['u'] / u0:.3f}", rule)
    return table


def steps_markdown(history: list[dict[str, Any]]) -> str:
    s0, u0 = history[0]["s"], history[0]["u"]
    lines = ["| step | weight applied | s (forget) | u (utility) | s / s_base | u / u_base | rule |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for rec in history:
        rule = _rule_text(rec)
        lines.append(f"| {rec['index']} | {step_label(rec)} | {rec['s']:.4g} | {rec['u']:.4g} | "
                     f"{rec['s'] / s0:.3f} | {rec['u'] / u0:.3f} | {rule} |")
    return "\n".join(lines) + "\n"


def plot_steps(history: list[dict[str, Any]], task: str) -> bytes:
    """Figure 3/4 shape: forget and utility scores (relative to the base model) across the steps."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s0, u0 = history[0]["s"], history[0]["u"]
    xs = [rec["index"] for rec in history]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(xs, [r["s"] / s0 for r in history], "o-", color="tab:red", label=f"forget score s ({task})")
    ax.plot(xs, [r["u"] / u0 for r in history], "s-", color="tab:green", label="utility score u")
    ax.set_xticks(xs, [step_label(r).split(" = ")[0] if r["kind"] != "base" else "base" for r in history])
    ax.set_ylabel("relative to the base model")
    ax.set_title("Release: PEM composition steps (eq. 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def stop_reason(cfg: RRConfig, history: list[dict[str, Any]]) -> str | None:
    """Why the release ends after the last recorded step, or None to go on (checked after every step).

    Done once s meets ``forget_target`` with u at or above ``utility_floor``, after a forget or a retain step
    (a retain step that kept s at the target and lifted u leaves a further forget step nothing to gain). Met
    with u below the floor, the release goes on: the next retain step exists to bring utility back (Table 9
    runs lambda_1 after a mu_0 that already cut MBPP by 92 %). After a forget step below the floor without the
    target, it gives up, but only from mu_1 on, once a retain step has had its chance."""
    last, rel = history[-1], cfg.release
    if last["kind"] == "base":
        return None
    if last["kind"] == "forget" and not last["accepted"] and rel.rules.on_reject == "stop":
        return f"{last['step']}: no weight met the forget rule (rules.on_reject: stop)"
    s0, u0 = history[0]["s"], history[0]["u"]
    met = rel.forget_target is not None and last["s"] <= rel.forget_target * s0
    low = rel.utility_floor is not None and last["u"] < rel.utility_floor * u0
    if met and not low:
        return f"forget target met: s {last['s']:.4g} <= {rel.forget_target:g} x s_base {s0:.4g}" + (
            f", u {last['u']:.4g} >= {rel.utility_floor:g} x u_base {u0:.4g}" if rel.utility_floor else "")
    if low and not met and last["kind"] == "forget" and last["step"] != "mu_0":
        return f"utility below its floor: u {last['u']:.4g} < {rel.utility_floor:g} x u_base {u0:.4g}"
    return None


def _answer_prompts(cfg_yaml: str, prompts: list[str]) -> list[str]:
    """Greedy answers of the base model (a Ray task: it loads the model where Ray placed it)."""
    from rr_ray.config import config_from_text
    from rr_ray.evaluation.scoring import Scorer, scorer_spec
    from rr_ray.generation.base import SamplingParams
    from rr_ray.models.loader import resolve_model

    c = config_from_text(cfg_yaml, "run.yaml")
    model_dir = resolve_model(c.model.name_or_path, c.model.cache_dir, c.run.s3_endpoint_url)
    scorer = Scorer.from_spec(model_dir, scorer_spec(c) | {"backend": "hf"}, threads=int(c.generation.cpus_per_actor))
    return [o[0] for o in scorer.generate(prompts, SamplingParams(max_new_tokens=c.task.eval_max_new_tokens))]


def base_answers(cfg: RRConfig, prompts: list[str]) -> list[str]:
    """The base model's greedy answers (``task.eval_max_new_tokens``), generated in a Ray task; Ray must be
    initialised."""
    import ray

    remote = ray.remote(num_cpus=cfg.generation.cpus_per_actor, num_gpus=cfg.generation.gpus_per_actor)(_answer_prompts)
    return ray.get(remote.remote(cfg.to_yaml(), prompts))


def single_edit(cfg: RRConfig, run: RunDir, step: str, coef: float, kind: str, rel: str = FINAL_ADAPTER) -> str:
    """release/<step>/adapter applied once with ``coef`` on the base, composed into ``rel``; returns its URI.
    Into the run's final adapter (the default) it becomes the run's edit log too."""
    log = EditLog(cfg.model.name_or_path).then(Edit(adapter=f"release/{step}/adapter", coef=coef, kind=kind, step=step))
    if rel == FINAL_ADAPTER:
        run.write_json(EDIT_LOG, log.to_json())
    return _compose_to_run(log, run, rel, cfg.run.s3_endpoint_url)


SELF_RETAIN_MAX_ASKED = 5  # x retain_rows: a model right on 1 in 5 retain prompts still fills the set


def self_retain_rows(cfg: RRConfig, run: RunDir, task: Any, n: int, console: Console) -> list[dict[str, str]]:
    """Retain rows answered by the base model itself and kept where the task's oracle says the answer is right
    (``release.retain_source: self``). Prompts are asked n at a time until n answers are right (at most
    SELF_RETAIN_MAX_ASKED x n); every answered chunk is kept in the run, so a killed run loses one chunk at most.
    """
    done, part = "release/retain_self.jsonl", "release/retain_self_asked.jsonl"
    if run.exists(done):
        return run.read_jsonl(done)[:n]
    pool = [r["prompt"] for r in task.retain_data(SELF_RETAIN_MAX_ASKED * n)]
    asked = run.read_jsonl(part) if run.exists(part) else []
    while sum(r["correct"] for r in asked) < n and len(asked) < len(pool):
        prompts = pool[len(asked): len(asked) + n]
        replies = base_answers(cfg, prompts)
        asked += [{"prompt": p, "response": r.strip(), "correct": bool(task.check_retain(p, r))}
                  for p, r in zip(prompts, replies)]
        run.write_jsonl(part, asked)
        console.print(f"release: self-generated retain data: {sum(r['correct'] for r in asked)} right of "
                      f"{len(asked)} asked (want {n})")
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in asked if r["correct"]]
    if not rows:
        raise ValueError(f"release.retain_source=self: the base model answered none of {len(asked)} retain "
                         "prompts correctly; use retain_source: curated")
    run.write_jsonl(done, rows)
    run.write_json("release/retain_self.json", {"asked": len(asked), "correct": len(rows)})
    return rows[:n]


def run_release(cfg: RRConfig, run: RunDir, console: Console | None = None,
                forget_rows: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The steps of equation 1 (skipping finished ones) until ``iterations`` or a stop condition; Ray must be
    initialised. ``forget_rows``: the forget set, when not the config's (a baseline's external data). Returns a
    summary."""
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    task = get_task(cfg.task)
    forget_rows = forget_rows if forget_rows is not None else load_forget_rows(cfg, run)
    retain_rows: list[dict[str, str]] = []
    if cfg.release.iterations > 0:  # mu_0 alone needs no retain data
        if cfg.release.retain_source == "self":
            retain_rows = self_retain_rows(cfg, run, task, cfg.release.retain_rows, console)
            console.print(f"release: {len(retain_rows)} self-generated retain rows (answers the oracle marks "
                          "correct)")
        else:
            retain_rows = task.retain_data(cfg.release.retain_rows)
        if not retain_rows:
            raise ValueError(f"task {cfg.task.name}: no retain data for the retain PEMs")
    log, history, stopped = EditLog(cfg.model.name_or_path), [], None
    for index, (step, kind) in enumerate(plan(cfg.release.iterations), start=1):
        if run.is_done(f"release-{step}"):
            rec = run.read_json(f"release/{step}/step.json")
            if not history:  # the base row was recorded with the first step
                history.append({"index": 0, "step": "base", "kind": "base", "coef": 0.0,
                                **run.read_json("release/base.json")})
            history.append(rec)
            if rec["coef"] != 0.0:
                log = log.then(Edit(adapter=f"release/{step}/adapter", coef=rec["coef"], kind=kind, step=step))
            console.print(f"release {step}: already done (coefficient {rec['coef']:+g}), skipped")
        else:
            rows = forget_rows if kind == "forget" else retain_rows
            log, rec = run_step(cfg, run, index, step, kind, log, history, rows, console)
            history.append(rec)
        if (stopped := stop_reason(cfg, history)) is not None:
            console.print(f"release: stopping after {step}: {stopped}")
            break
    final = _compose_to_run(log, run, FINAL_ADAPTER, cfg.run.s3_endpoint_url)
    run.write_json("release/steps.json", history)
    run.write_text("release/steps.md", steps_markdown(history))
    run.write_bytes("release/metrics.png", plot_steps(history, cfg.task.name))
    console.print(steps_table(history, f"release: {cfg.task.name}, {cfg.model.name_or_path}"))
    s0, u0, s1, u1 = history[0]["s"], history[0]["u"], history[-1]["s"], history[-1]["u"]
    summary = {"steps": len(history) - 1, "edit_log": log.to_json(), "composed_adapter": final,
               "s_base": s0, "u_base": u0, "s_final": s1, "u_final": u1,
               "forget_drop": 1 - s1 / s0 if s0 else 0.0, "utility_kept": u1 / u0 if u0 else 0.0,
               "stopped": stopped, "seconds": round(time.perf_counter() - t0, 1)}
    run.mark_done("release", {k: v for k, v in summary.items() if k != "edit_log"})
    return summary
