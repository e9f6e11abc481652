"""Ray Serve deployment of the unlearned model behind an OpenAI-compatible HTTP API (see app.py)."""

from typing import Any

from rr_ray.serving.sources import adapter_from_run

__all__ = ["adapter_from_run", "build_app", "serve_run"]


def __getattr__(name: str) -> Any:  # app.py imports Ray Serve and FastAPI: load it only when asked for
    if name in ("build_app", "serve_run"):
        from rr_ray.serving import app

        return getattr(app, name)
    raise AttributeError(name)
