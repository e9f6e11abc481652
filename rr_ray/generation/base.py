"""The one interface every generation backend implements, and the values that cross it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. temperature 0 means greedy; ``seed`` makes sampling repeatable per batch."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int = 0
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks need a fixed token budget)


@dataclass(frozen=True)
class Request:
    """One prompt. ``chat`` renders it with the tokenizer's chat template; ``adapter`` is a PEFT LoRA dir."""

    prompt: str
    chat: bool = True
    adapter: str | None = None


@dataclass
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    meta: dict[str, Any] = field(default_factory=dict)


class Generator(Protocol):
    """A backend: turns requests into ``n`` completions each, returned in request order."""

    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Completion]]: ...


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; report whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def make_generator(backend: str, **kwargs: Any) -> Generator:
    """Build a backend by name; the heavy engine module is imported only when chosen."""
    if backend == "hf":
        from rr_ray.generation.hf_generator import HFGenerator

        return HFGenerator(**kwargs)
    if backend == "vllm":
        from rr_ray.generation.vllm_generator import VLLMGenerator

        return VLLMGenerator(**kwargs)
    raise ValueError(f"unknown generation backend {backend!r} (expected 'hf' or 'vllm')")
