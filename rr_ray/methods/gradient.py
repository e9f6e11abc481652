"""Gradient unlearning baselines of the open-unlearning family, each one LoRA applied once as it is (+1):
NPO (Zhang et al. 2024) and GradDiff, trained on the task's external forget rows (the curated data that
pem_external and ext_sub use, never evaluation items) beside its retain rows. The losses are in
``release/objectives.py``; training is Ray Train's, as for every PEM."""

from __future__ import annotations

from rr_ray.config import RRConfig
from rr_ray.methods.base import MethodResult, train_and_apply
from rr_ray.storage import RunDir


class _GradientMethod:
    name = ""
    objective = ""

    def objective_args(self, cfg: RRConfig) -> dict[str, float]:
        return {"retain_weight": cfg.compare.retain_weight}

    def run(self, cfg: RRConfig, run: RunDir) -> MethodResult:
        from rr_ray.methods.pem_external import external_rows
        from rr_ray.tasks.base import get_task

        forget = external_rows(cfg, run, self.name)
        retain = get_task(cfg.task).retain_data(cfg.release.retain_rows)
        rows = [r | {"kind": "forget"} for r in forget] + [r | {"kind": "retain"} for r in retain]
        adapter, train = train_and_apply(cfg, run, self.name, rows, objective=self.objective,
                                         objective_args=self.objective_args(cfg))
        return MethodResult(adapter, {"forget_rows": len(forget), "retain_rows": len(retain), "coef": 1.0,
                                      "train": train})


class Npo(_GradientMethod):
    name = objective = "npo"

    def objective_args(self, cfg: RRConfig) -> dict[str, float]:
        return super().objective_args(cfg) | {"beta": cfg.compare.npo_beta}


class GradDiff(_GradientMethod):
    name = objective = "graddiff"
