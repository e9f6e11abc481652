"""PEM-external (paper section 4.2): one forget LoRA trained on the task's external forget data (curated
examples of the capability, never evaluation items), subtracted once with its weight chosen by the forget rule
on the validation halves: equation 1 with mu_0 alone and a forget set that Reveal did not make."""

from __future__ import annotations

from rr_ray.config import RRConfig, config_from_text
from rr_ray.methods.base import MethodResult, release_info
from rr_ray.storage import RunDir

ROWS = "external/forget.jsonl"


class PemExternal:
    name = "pem_external"

    def run(self, cfg: RRConfig, run: RunDir) -> MethodResult:
        from rr_ray.release.loop import run_release

        rows = external_rows(cfg, run, self.name)
        release = run.done_info("release") or run_release(one_step(cfg), run, forget_rows=rows)
        return MethodResult(release["composed_adapter"], {"forget_rows": len(rows), **release_info(release)})


def external_rows(cfg: RRConfig, run: RunDir, method: str) -> list[dict[str, str]]:
    """``compare.external_rows`` rows of the task's external forget data, kept in the run (read back on resume)."""
    from rr_ray.tasks.base import get_task

    if not run.exists(ROWS):
        rows = get_task(cfg.task).external_forget_data(cfg.compare.external_rows)
        if not rows:
            raise ValueError(f"{method}: task {cfg.task.name!r} has no external forget data")
        run.write_jsonl(ROWS, rows)
    return run.read_jsonl(ROWS)


def one_step(cfg: RRConfig) -> RRConfig:
    """Equation 1 cut to mu_0: one forget PEM subtracted once, its weight chosen by the forget rule."""
    return config_from_text(cfg.to_yaml(), "compare", ["release.iterations=0", "release.forget_rows=null"])
