"""What an unlearning method is to ``rr-ray compare``: one class that turns a config into a LoRA edit.

A method runs in its own run directory (resumable there), inside a Ray task that may start actors, Ray Train
and Tune like a driver does. It returns the composed adapter to evaluate (None: it leaves the model as it is)
and what it measured on the validation halves while choosing its weights; ``rr-ray compare`` then evaluates
every method's adapter and the base model on the same test halves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rr_ray.config import RRConfig
from rr_ray.storage import RunDir


@dataclass
class MethodResult:
    adapter: str | None  # URI of the composed LoRA (in the method's run directory), None = no edit
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able: weights chosen, validation s/u, data sizes


@runtime_checkable
class Method(Protocol):
    name: str

    def run(self, cfg: RRConfig, run: RunDir) -> MethodResult: ...


def release_info(release: dict[str, Any]) -> dict[str, Any]:
    """The figures of a release summary (``run_release``'s return or done marker) a method reports."""
    return {k: release[k] for k in ("s_base", "u_base", "s_final", "u_final", "steps") if k in release}


def get_method(name: str) -> Method:
    """The method plugin ``name`` (a built-in or ``package.module:Class``), instantiated."""
    from rr_ray.plugins import METHODS, load

    return load("method", METHODS, name)()


def train_and_apply(cfg: RRConfig, run: RunDir, step: str, rows: list[dict[str, str]],
                    **train_kw: Any) -> tuple[str, dict[str, Any]]:
    """Train one LoRA on ``rows`` (``release.loop.train_step``; ``train_kw`` picks its loss or loop) and apply it
    once as it is (+1): the baselines whose loss unlearns by itself. Returns the composed adapter's URI and the
    training record; both steps are skipped on a rerun."""
    from rr_ray.release.loop import single_edit, train_step

    train = train_step(cfg, run, step, rows, None, **train_kw)
    if (done := run.done_info("release")) is None:
        done = {"composed_adapter": single_edit(cfg, run, step, 1.0, step)}
        run.mark_done("release", done)
    return done["composed_adapter"], train
