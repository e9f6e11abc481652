"""A pool of Ray actors over one generation backend.

Requests are cut into batches and fed to the actors as they free up; results come back in input order.
A dead actor is restarted by Ray (``max_restarts``) and its in-flight batches are re-run on it
(``max_task_retries``); because every batch carries its own index and seed, a retried batch fills exactly
its own rows, so nothing is lost or duplicated.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from pathlib import Path
from typing import Any, Callable

import ray

from rr_ray.config import GenerationConfig
from rr_ray.generation.base import Completion, Request, SamplingParams, make_generator


class GeneratorWorker:
    """Plain class holding one backend; the pool makes it a Ray actor."""

    def __init__(self, backend: str, backend_kwargs: dict[str, Any], model_ref: str | None = None) -> None:
        if model_ref and not Path(backend_kwargs["model_dir"]).is_dir():
            # An actor on another node than the driver: resolve the model (packaged, s3, hub) on this node.
            from rr_ray.models.loader import resolve_model

            backend_kwargs = {**backend_kwargs, "model_dir": str(resolve_model(model_ref))}
        self.generator = make_generator(backend, **backend_kwargs)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, batch_id: int, requests: list[Request], params: SamplingParams) -> tuple[int, list]:
        return batch_id, self.generator.generate(requests, params)


def backend_kwargs(cfg: GenerationConfig, model_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Constructor arguments of the configured backend (a vllm pool serves the base model: no LoRA)."""
    if cfg.backend == "hf":
        return dict(model_dir=str(model_dir), dtype=cfg.dtype, threads=max(1, int(cfg.cpus_per_actor)),
                    batch_size=cfg.batch_size)
    return dict(model_dir=str(model_dir), dtype=cfg.dtype, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                seed=seed, cpu_kvcache_gib=cfg.vllm_cpu_kvcache_gib)


class GeneratorPool:
    """``num_actors`` generator actors; ``generate`` spreads batches over them and keeps input order."""

    def __init__(self, cfg: GenerationConfig, model_dir: str | Path, seed: int = 0,
                 model_ref: str | None = None) -> None:
        """``model_ref`` (the config's model.name_or_path) lets actors on other nodes resolve the model."""
        self.cfg = cfg
        actor_cls = ray.remote(
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor,
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_task_retries,
        )(GeneratorWorker)
        kwargs = backend_kwargs(cfg, model_dir, seed)
        self.actors = [actor_cls.remote(cfg.backend, kwargs, model_ref) for _ in range(cfg.num_actors)]
        ray.get([a.pid.remote() for a in self.actors])  # fail here, not mid-run, if a backend cannot load

    def actor_pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def generate(self, requests: list[Request], params: SamplingParams,
                 on_batch: Callable[[int], None] | None = None) -> list[list[Completion]]:
        """n completions per request in request order; ``on_batch(rows_done)`` reports progress."""
        size = self.cfg.batch_size
        batches = deque((i, requests[s : s + size]) for i, s in enumerate(range(0, len(requests), size)))
        results: dict[int, list[list[Completion]]] = {}
        inflight: dict[ray.ObjectRef, ray.actor.ActorHandle] = {}
        idle = deque(self.actors * 2)  # two batches per actor keep it busy while one result transfers
        while batches or inflight:
            while batches and idle:
                actor = idle.popleft()
                batch_id, batch = batches.popleft()
                # Each batch gets its own seed so a retried batch samples exactly what the first try would.
                batch_params = dataclasses.replace(params, seed=params.seed * 1_000_003 + batch_id)
                inflight[actor.generate.remote(batch_id, batch, batch_params)] = actor
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(ready[0])
            try:
                batch_id, outs = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                raise RuntimeError(
                    f"a generator actor died and its batch could not be retried "
                    f"(max_restarts={self.cfg.max_restarts}, max_task_retries={self.cfg.max_task_retries}): "
                    f"{str(exc).splitlines()[0]}"
                ) from exc
            results[batch_id] = outs
            idle.append(actor)
            if on_batch:
                on_batch(len(outs))
        ordered = [row for i in range(len(results)) for row in results[i]]
        if len(ordered) != len(requests):
            raise RuntimeError(f"generator pool returned {len(ordered)} rows for {len(requests)} requests")
        return ordered

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
