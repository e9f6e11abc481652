"""DPO baseline (paper section 4.2; Tables 2-4): a LoRA trained with trl's DPO loss to prefer a refusal over
the model's own answer to each forget prompt, applied once as it is (+1). The prompts are the task's reveal
contexts, never evaluation items; the answers are the base model's greedy ones (self-generated, as the forget
data of ours is, but without the instruction search)."""

from __future__ import annotations

from rr_ray.config import RRConfig
from rr_ray.methods.base import MethodResult, train_and_apply
from rr_ray.storage import RunDir

PAIRS = "dpo/pairs.jsonl"


class Dpo:
    name = "dpo"

    def run(self, cfg: RRConfig, run: RunDir) -> MethodResult:
        from rr_ray.release.loop import base_answers
        from rr_ray.release.preference import dpo_loop_per_worker, preference_rows
        from rr_ray.tasks.base import get_task

        if not run.exists(PAIRS):
            prompts = get_task(cfg.task).contexts(cfg.compare.preference_rows, seed=cfg.run.seed)
            rows = preference_rows(prompts, base_answers(cfg, prompts), cfg.compare.refusal)
            if not rows:
                raise ValueError(f"dpo: the base model answered none of {len(prompts)} forget prompts")
            run.write_jsonl(PAIRS, rows)
        rows = run.read_jsonl(PAIRS)
        adapter, train = train_and_apply(cfg, run, "dpo", rows, loop=dpo_loop_per_worker,
                                         objective_args={"beta": cfg.compare.dpo_beta})
        return MethodResult(adapter, {"pairs": len(rows), "coef": 1.0, "train": train})
