"""The ``hf`` serving engine: turns one rendered prompt into a stream of text chunks per choice.

The hand-written front end (app.py) knows only ``Engine.submit``. It is kept for what ``ray.serve.llm`` cannot
do: serve without vLLM (machines with no vLLM wheel) and serve a local adapter with no object store. vLLM
serving is ``ray.serve.llm`` itself (llm_app.py).

Concurrent requests are grouped by Ray Serve's ``@serve.batch`` and decoded in one ``generate`` call per
sampling setting; rows carry their own adapter (peft mixed-adapter batch), so the unlearned model and the base
share one set of weights. Streaming uses a streamer that receives every decoding step's tokens for the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from ray import serve

from rr_ray.generation.base import Request, SamplingParams, cut_at_stop


@dataclass(frozen=True)
class Job:
    """One prompt, already rendered (chat template applied); ``params.n`` choices; ``seed`` None = unseeded."""

    text: str
    adapter: str | None
    params: SamplingParams
    seed: int | None = None
    stream: bool = False  # False: only each choice's final chunk is sent (no per-token work)


@dataclass(frozen=True)
class Chunk:
    """New text of choice ``index``; the choice's last chunk has ``finish_reason`` and its token count."""

    index: int
    text: str
    finish_reason: str | None = None
    num_tokens: int = 0


_END = object()


class JobStream:
    """The chunks of one job, fed from any thread; iteration ends after the last one or raises the job's error."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def put(self, item: Chunk | BaseException | object) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        while (item := await self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


class Engine(Protocol):
    def submit(self, job: Job) -> JobStream:
        """Start the job now (inside a running event loop) and return its chunk stream."""
        ...


class _RowStreamer:
    """A transformers streamer for a whole batch: decodes each streamed row and sends only stable new text.

    Text that could still become a stop string, or an incomplete UTF-8 character, is held back; the final
    chunk then carries whatever the authoritative completion adds, so streamed text equals non-streamed text.
    """

    def __init__(self, tokenizer: Any, sinks: list[tuple[JobStream, int] | None], stop: tuple[str, ...]) -> None:
        self.tokenizer, self.sinks, self.stop = tokenizer, sinks, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[list[int]] = [[] for _ in sinks]
        self.sent = ["" for _ in sinks]
        self.done = [sink is None for sink in sinks]
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt ids
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token == self.tokenizer.eos_token_id:
                self.done[row] = True
                continue
            self.ids[row].append(token)
            text, hit = cut_at_stop(self.tokenizer.decode(self.ids[row], skip_special_tokens=True), self.stop)
            if hit:
                self.done[row] = True
            else:
                text = text[: len(text) - self.hold].rstrip("\ufffd")
            if len(text) > len(self.sent[row]) and text.startswith(self.sent[row]):
                stream, index = self.sinks[row]  # type: ignore[misc]
                stream.put(Chunk(index, text[len(self.sent[row]):]))
                self.sent[row] = text

    def end(self) -> None:
        pass

    def sent_text(self, row: int) -> str:
        return self.sent[row]


@dataclass
class _Pending:
    job: Job
    stream: JobStream


class HFEngine:
    """transformers engine with request batching by ``@serve.batch`` (one batch decodes at a time)."""

    def __init__(self, model_dir: str | Path, adapters: list[str | None], dtype: str = "float32",
                 threads: int | None = None, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.02,
                 device: str | None = None) -> None:
        from rr_ray.generation.hf_generator import HFGenerator

        # Built inside the Serve replica: the model goes to the GPU Ray gave the replica (ServeArgs.num_gpus)
        # through loader.model_device(), else to the CPU.
        self.generator = HFGenerator(model_dir, dtype=dtype, threads=threads, batch_size=max_batch_size,
                                     device=device)
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._tasks: set[asyncio.Future] = set()
        # Load every adapter now (one decoding step each), so the first request pays no loading and a broken
        # adapter fails the replica's start instead of a request.
        self.generator.generate_batch([Request("Hello", chat=False, adapter=a) for a in adapters],
                                      SamplingParams(max_new_tokens=1))

    def submit(self, job: Job) -> JobStream:
        stream = JobStream()
        task = asyncio.ensure_future(self._batched(_Pending(job, stream)))
        self._tasks.add(task)  # keep a reference until done; errors already reached the stream

        def _finished(t: asyncio.Future) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                stream.put(t.exception())

        task.add_done_callback(_finished)
        return stream

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _batched(self, pending: list[_Pending]) -> list[None]:
        # generate() takes one SamplingParams per call: requests with the same settings decode together.
        groups: dict[tuple[SamplingParams, int | None], list[_Pending]] = {}
        for p in pending:
            groups.setdefault((p.job.params, p.job.seed), []).append(p)
        for (params, seed), group in groups.items():
            try:
                await asyncio.to_thread(self._decode, group, params, seed)
            except Exception as exc:  # a failed group fails its requests only; the replica keeps serving
                for p in group:
                    p.stream.put(exc)
                continue
            for p in group:
                p.stream.put(_END)
        return [None] * len(pending)

    def _decode(self, group: list[_Pending], params: SamplingParams, seed: int | None) -> None:
        import torch

        rows = [(p, i) for p in group for i in range(params.n)]
        one = replace(params, n=1)
        if params.temperature > 0 and seed is not None:
            torch.manual_seed(seed)
        size = self.generator.batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            streamer = None
            if any(p.job.stream for p, _ in chunk):
                sinks = [(p.stream, i) if p.job.stream else None for p, i in chunk]
                streamer = _RowStreamer(self.generator.tokenizer, sinks, params.stop)
            outs = self.generator.generate_batch(
                [Request(p.job.text, chat=False, adapter=p.job.adapter) for p, _ in chunk], one, streamer)
            for row, ((p, i), out) in enumerate(zip(chunk, outs)):
                sent = streamer.sent_text(row) if streamer is not None and p.job.stream else ""
                rest = out.text[len(sent):] if out.text.startswith(sent) else ""
                p.stream.put(Chunk(i, rest, out.finish_reason, out.num_tokens))


__all__ = ["Chunk", "Engine", "HFEngine", "Job", "JobStream"]
