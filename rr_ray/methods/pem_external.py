"""PEM-external (paper section 4.2): one forget LoRA trained on the task's external forget data (curated
examples of the capability, never evaluation items), subtracted once with its weight chosen by the forget rule
on the validation halves: equation 1 with mu_0 alone and a forget set that Reveal did not make."""

from __future__ import annotations

from rr_ray.config import RRConfig, config_from_text
from rr_ray.methods.base import MethodResult
from rr_ray.storage import RunDir

ROWS = "external/forget.jsonl"


class PemExternal:
    name = "pem_external"

    def run(self, cfg: RRConfig, run: RunDir) -> MethodResult:
        from rr_ray.release.loop import run_release
        from rr_ray.tasks.base import get_task

        if not run.exists(ROWS):
            rows = get_task(cfg.task).external_forget_data(cfg.compare.external_rows)
            if not rows:
                raise ValueError(f"pem_external: task {cfg.task.name!r} has no external forget data")
            run.write_jsonl(ROWS, rows)
        rows = run.read_jsonl(ROWS)
        one_step = config_from_text(cfg.to_yaml(), "compare", ["release.iterations=0", "release.forget_rows=null"])
        release = run.done_info("release") or run_release(one_step, run, forget_rows=rows)
        info = {"forget_rows": len(rows)}
        info |= {k: release[k] for k in ("s_base", "u_base", "s_final", "u_final", "steps") if k in release}
        return MethodResult(release["composed_adapter"], info)
