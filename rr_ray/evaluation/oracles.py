"""Relevance oracles backed by a transformers text classifier (a local path, s3-synced dir or hub id)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence


@functools.cache
def text_classifier(name_or_path: str, positive_label: str) -> Callable[[Sequence[str]], list[float]]:
    """Score texts by the classifier's probability of the labels containing ``positive_label``.

    Labels such as "non-toxic" / "not_target" are excluded, so "toxic" picks the toxic class only.
    """
    from transformers import pipeline

    clf = pipeline("text-classification", model=name_or_path, top_k=None, truncation=True)
    want = positive_label.lower()

    def score(texts: Sequence[str]) -> list[float]:
        out = []
        for labels in clf(list(texts)):
            hits = [d["score"] for d in labels
                    if want in d["label"].lower() and not d["label"].lower().startswith(("non", "not"))]
            out.append(float(max(hits)) if hits else 0.0)
        return out

    return score
