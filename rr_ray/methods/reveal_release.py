"""Ours: Reveal (Algorithm 1, the model's own forget data) then Release (equation 1, iterated)."""

from __future__ import annotations

from rr_ray.config import RRConfig
from rr_ray.methods.base import MethodResult, release_info
from rr_ray.models.loader import resolve_model
from rr_ray.storage import RunDir


class RevealRelease:
    name = "reveal_release"

    def run(self, cfg: RRConfig, run: RunDir) -> MethodResult:
        from rr_ray.release.loop import run_release
        from rr_ray.reveal.loop import run_reveal

        info: dict = {}
        if not cfg.release.forget_path:
            model_dir = str(resolve_model(cfg.model.name_or_path, cfg.model.cache_dir, cfg.run.s3_endpoint_url))
            reveal = run_reveal(cfg, run, model_dir, progress=False)
            info["forget_rows"] = reveal["forget_size"]
        release = run.done_info("release") or run_release(cfg, run)
        return MethodResult(release["composed_adapter"], info | release_info(release))
