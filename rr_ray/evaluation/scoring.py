"""One scoring handle for every task: generate and teacher-forced log-likelihood, under an optional adapter.

A candidate model is "base + edit log"; DESIGN.md's exact composition turns any edit log into one stacked
LoRA directory, so a score needs only the base model (held once here) and that adapter dir (None = base).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rr_ray.generation.base import Request, SamplingParams


class Scorer:
    """Wraps a generator that also offers ``loglik`` (the hf backend); tasks score models only through this."""

    def __init__(self, generator: Any) -> None:
        if not hasattr(generator, "loglik"):
            raise TypeError(f"{type(generator).__name__} has no loglik(); use the hf backend for scoring")
        self.generator = generator

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, dtype: str = "float32", batch_size: int = 16,
                       threads: int | None = None) -> Scorer:
        from rr_ray.generation.hf_generator import HFGenerator

        return cls(HFGenerator(model_dir, dtype=dtype, threads=threads, batch_size=batch_size))

    def generate(self, prompts: list[str], params: SamplingParams, adapter: str | None = None,
                 chat: bool = True) -> list[list[str]]:
        """``params.n`` completion texts per prompt, in prompt order."""
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
