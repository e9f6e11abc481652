"""A finished Release run built by hand (no Ray): two random PEFT LoRAs, an edit log, the composed LoRA.

The LoRAs differ in rank and targets, so composition has to stack zero blocks, and their B matrices are
random (peft's ``init_lora_weights=False``), so every edit really changes the model.
"""

from __future__ import annotations

from pathlib import Path

from rr_ray.config import RRConfig, load_config
from rr_ray.release.loop import EDIT_LOG, FINAL_ADAPTER, plot_steps, steps_markdown
from rr_ray.release.pem import Edit, EditLog, compose
from rr_ray.storage import RunDir

# (step, kind, coef, rank, target modules)
EDITS = (("mu_0", "forget", -1.5, 4, ["q_proj", "v_proj"]),
         ("lambda_1", "retain", 0.7, 2, ["k_proj", "v_proj", "o_proj"]))


def _random_lora(model_dir: Path, out: Path, r: int, targets: list[str], seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, cfg).save_pretrained(str(out))


def make_release_run(model_dir: Path, root: Path) -> tuple[RunDir, RRConfig]:
    """A local run dir at ``root`` holding what ``run_release`` leaves (adapters, logs, steps, marker)."""
    cfg = load_config(None, [f"run.dir={root}", f"model.name_or_path={model_dir}", "task.name=code"])
    run = RunDir.open(str(root))
    run.write_text("run.yaml", cfg.to_yaml())
    log = EditLog(str(model_dir))
    history = [{"index": 0, "step": "base", "kind": "base", "coef": 0.0, "s": 0.8, "u": 0.5}]
    for i, (step, kind, coef, r, targets) in enumerate(EDITS, start=1):
        _random_lora(model_dir, root / f"release/{step}/adapter", r, targets, seed=i)
        log = log.then(Edit(f"release/{step}/adapter", coef, kind, step))
        compose(log, root / f"release/{step}/composed", root=root)
        history.append({"index": i, "step": step, "kind": kind, "coef": coef, "accepted": i == 1,
                        "reason": "hand-made", "s": 0.8 - 0.25 * i, "u": 0.5 - 0.05 * i,
                        "trials": [{"coef": coef, "s": 0.8 - 0.25 * i, "u": 0.5 - 0.05 * i},
                                   {"coef": 2 * coef, "s": 0.1, "u": 0.1}],
                        "train": {"rows": 12, "epochs": 2, "losses": [3.25 - i, 2.5 - i], "seconds": 10.0 * i},
                        "seconds": {"train": 11.5 * i, "sweep": 7.25 * i, "total": 18.75 * i}})
    compose(log, root / FINAL_ADAPTER, root=root)
    run.write_json(EDIT_LOG, log.to_json())
    run.write_json("release/base.json", {"s": history[0]["s"], "u": history[0]["u"]})
    run.write_json("release/steps.json", history)
    run.write_text("release/steps.md", steps_markdown(history))
    run.write_bytes("release/metrics.png", plot_steps(history, cfg.task.name))
    for i, (step, *_) in enumerate(EDITS, start=1):
        run.mark_done(f"release-{step}-train", {"seconds": 10.0 * i})
        run.mark_done(f"release-{step}", {"coef": history[i]["coef"]})
    s0, u0, s1, u1 = history[0]["s"], history[0]["u"], history[-1]["s"], history[-1]["u"]
    run.mark_done("release", {"steps": len(EDITS), "composed_adapter": str(root / FINAL_ADAPTER), "s_base": s0,
                              "u_base": u0, "s_final": s1, "u_final": u1, "forget_drop": 1 - s1 / s0,
                              "utility_kept": u1 / u0, "seconds": 42.5})
    return run, cfg
