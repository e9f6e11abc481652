"""One scoring handle for every task: generate and teacher-forced log-likelihood, under an optional adapter.

A candidate model is "base + edit log"; DESIGN.md's exact composition turns any edit log into one stacked
LoRA directory, so a score needs only the base model (held once here) and that adapter dir (None = base).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rr_ray.generation.base import Request, SamplingParams

if TYPE_CHECKING:
    from rr_ray.config import RRConfig

T = TypeVar("T")


def scorer_spec(cfg: RRConfig) -> dict[str, Any]:
    """What ``Scorer.from_spec`` needs, as plain data (it crosses into Ray tasks and Tune trials)."""
    gen, rel = cfg.generation, cfg.release
    return {"backend": cfg.task.scoring_backend, "dtype": cfg.model.dtype, "batch_size": cfg.task.scoring_batch_size,
            "vllm": {"max_lora_rank": rel.max_composed_rank, "lora_modules": list(rel.lora.target_modules),
                     "cpu_kvcache_gib": gen.vllm_cpu_kvcache_gib,
                     "max_loras": gen.vllm_max_loras, "gpu_memory_utilization": gen.vllm_gpu_memory_utilization,
                     "seed": cfg.run.seed}}


class Scorer:
    """Wraps a generator that also offers ``loglik`` (hf or vllm); tasks score models only through this."""

    def __init__(self, generator: Any) -> None:
        if not hasattr(generator, "loglik"):
            raise TypeError(f"{type(generator).__name__} has no loglik()")
        self.generator = generator
        self._recorded: list[tuple[Request, str]] | None = None  # rows asked for while recording
        self._answers: dict[tuple[Request, str], tuple[float, int]] = {}

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, dtype: str = "float32", batch_size: int = 16,
                       threads: int | None = None, device: str | None = None) -> Scorer:
        """hf scorer; ``device`` None = ``loader.model_device()`` (the GPU Ray assigned to this worker, if any)."""
        from rr_ray.generation.hf_generator import HFGenerator

        return cls(HFGenerator(model_dir, dtype=dtype, threads=threads, batch_size=batch_size, device=device))

    @classmethod
    def from_spec(cls, model_dir: str | Path, spec: dict[str, Any], threads: int | None = None) -> Scorer:
        """The scorer ``scorer_spec(cfg)`` describes (hf, or one vLLM engine)."""
        if spec["backend"] == "vllm":
            from rr_ray.generation.vllm_generator import VLLMGenerator

            return cls(VLLMGenerator(model_dir, dtype=spec["dtype"], **spec["vllm"]))
        return cls.from_model_dir(model_dir, dtype=spec["dtype"], batch_size=spec["batch_size"], threads=threads)

    def score_together(self, jobs: list[Callable[[Scorer], T]]) -> list[T]:
        """Run scoring jobs (each calls only ``loglik``) with every row of every job in one backend call.

        Each job runs twice: first while this scorer records the rows it asks for (and answers with
        placeholders), then, after all recorded rows were scored together, on the real answers. With vLLM
        that is one engine call for, e.g., every candidate weight of a sweep (a different adapter per row).
        """
        self._recorded = []
        try:
            for job in jobs:
                job(self)
            rows = list(dict.fromkeys(self._recorded))
        finally:
            self._recorded = None
        if rows:
            scored = self.generator.loglik([r for r, _ in rows], [c for _, c in rows])
            self._answers = dict(zip(rows, scored))
        try:
            return [job(self) for job in jobs]
        finally:
            self._answers = {}

    def generate(self, prompts: list[str], params: SamplingParams, adapter: str | None = None,
                 chat: bool = True) -> list[list[str]]:
        """``params.n`` completion texts per prompt, in prompt order."""
        if self._recorded is not None:
            raise TypeError("score_together takes jobs that only score likelihoods; this one generates")
        outs = self.generator.generate([Request(p, chat=chat, adapter=adapter) for p in prompts], params)
        return [[c.text for c in group] for group in outs]

    def loglik(self, prompts: list[str], continuations: list[str], adapter: str | None | list[str | None] = None,
               chat: bool = True) -> list[tuple[float, int]]:
        """(summed NLL in nats, scored tokens) of each continuation given its prompt.

        ``adapter`` may be a list, one per row: then rows under different adapters share batches (peft
        mixed-adapter batches), e.g. every candidate weight of a sweep scored in one pass.
        """
        adapters = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(adapters)} adapters for {len(prompts)} prompts")
        reqs = [Request(p, chat=chat, adapter=a) for p, a in zip(prompts, adapters)]
        if self._recorded is not None:
            self._recorded.extend(zip(reqs, continuations))
            return [(0.0, 1)] * len(reqs)
        if self._answers:
            return [self._answers[row] for row in zip(reqs, continuations)]
        return self.generator.loglik(reqs, continuations)

    def mean_token_loglik(self, prompts: list[str], continuations: list[str], adapter: str | None = None,
                          chat: bool = True) -> float:
        """Token-weighted mean log-likelihood per token over all pairs (<= 0; higher = more likely)."""
        pairs = self.loglik(prompts, continuations, adapter, chat)
        tokens = sum(n for _, n in pairs)
        return -sum(nll for nll, _ in pairs) / tokens if tokens else -math.inf


def likelihood_score(mean_loglik: float) -> float:
    """exp(mean per-token log-likelihood) in (0, 1]: the geometric-mean token probability (= 1/perplexity).

    The threshold rules of section 3.2 compare ratios (s_i <= 0.1 s_{i-1}, u_i >= 0.95 u_{i-1}), which need a
    positive score that falls as the model forgets; a raw log-likelihood is negative, so tasks report this.
    """
    return math.exp(mean_loglik)
