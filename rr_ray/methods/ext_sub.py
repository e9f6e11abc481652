"""Ext-Sub (Hu et al. 2024, "Separate the wheat from the chaff"): an expert PEM trained on the task's retain
data and an anti-expert PEM trained on its external forget data; the anti-expert's deficiency part, what lies
outside the expert update's column space (``release.subspace.deficiency_lora``), is subtracted once with its
weight chosen by the forget rule on the validation halves. Unlike the published code this works for non-square
projections: the split is per output row space, whatever the module's shape."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rr_ray.config import RRConfig
from rr_ray.methods.base import MethodResult, release_info
from rr_ray.methods.pem_external import external_rows, one_step
from rr_ray.storage import RunDir, localize


class ExtSub:
    name = "ext_sub"

    def run(self, cfg: RRConfig, run: RunDir) -> MethodResult:
        from rr_ray.release.loop import run_release, train_step
        from rr_ray.release.subspace import deficiency_lora
        from rr_ray.tasks.base import get_task

        forget = external_rows(cfg, run, self.name)
        retain = get_task(cfg.task).retain_data(cfg.release.retain_rows)
        trained = {step: train_step(cfg, run, step, rows, None)
                   for step, rows in (("expert", retain), ("anti_expert", forget))}
        # mu_0's PEM is the deficiency part; marked trained, so the release below only sweeps its weight.
        if not run.is_done("release-mu_0-train"):
            dirs = {s: localize(f"{run.uri.rstrip('/')}/release/{s}/adapter", endpoint_url=cfg.run.s3_endpoint_url)
                    for s in trained}
            with tempfile.TemporaryDirectory(prefix="rr-ray-extsub-") as tmp:
                run.upload_dir(deficiency_lora(dirs["anti_expert"], dirs["expert"], Path(tmp) / "adapter"),
                               "release/mu_0/adapter")
            run.mark_done("release-mu_0-train", {"rows": len(forget), "ext_sub": trained})
        release = run.done_info("release") or run_release(one_step(cfg), run, forget_rows=forget)
        return MethodResult(release["composed_adapter"],
                            {"forget_rows": len(forget), "retain_rows": len(retain), **release_info(release)})
