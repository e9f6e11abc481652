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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from rr_ray.config import GenerationConfig
from rr_ray.generation.base import Completion, Request, SamplingParams, make_generator

# A function of (transformers model, tokenizer, *args) that a pool runs inside its actors.
ModelFn = Callable[..., Any]


class GeneratorWorker:
    """Plain class holding one backend; the pool makes it a Ray actor."""

    def __init__(self, backend: str, backend_kwargs: dict[str, Any], model_ref: str | None = None) -> None:
        if model_ref and not Path(backend_kwargs["model_dir"]).is_dir():
            # An actor on another node than the driver: resolve the model (packaged, s3, hub) on this node.
            from rr_ray.models.loader import resolve_model

            backend_kwargs = {**backend_kwargs, "model_dir": str(resolve_model(model_ref))}
        self.model_dir, self.dtype = backend_kwargs["model_dir"], backend_kwargs.get("dtype", "auto")
        self.generator = make_generator(backend, **backend_kwargs)
        self._hf_copy: tuple[Any, Any] | None = None

    def pid(self) -> int:
        return os.getpid()

    def generate(self, batch_id: int, requests: list[Request], params: SamplingParams) -> tuple[int, list]:
        return batch_id, self.generator.generate(requests, params)

    def with_model(self, batch_id: int, fn: ModelFn, *args: Any) -> tuple[int, Any]:
        """``fn(model, tokenizer, *args)`` on this actor's transformers model, on the device Ray gave it.

        The hf backend lends its own model. An engine that hides it (vLLM) gets a transformers copy loaded on
        first use, kept until ``drop_model_copy``: on a GPU that copy needs room beside vLLM's reservation.
        """
        model = getattr(self.generator, "model", None)
        if model is not None:
            return batch_id, fn(model, self.generator.tokenizer, *args)
        if self._hf_copy is None:
            from rr_ray.models.loader import load_model, load_tokenizer, model_device

            self._hf_copy = (load_model(self.model_dir, self.dtype, device=model_device()),
                             load_tokenizer(self.model_dir))
        return batch_id, fn(*self._hf_copy, *args)

    def drop_model_copy(self) -> None:
        if self._hf_copy is not None:
            self._hf_copy = None
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


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
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg = cfg
        # All actors' resources are reserved at once (a placement group), so two pools started side by side
        # (rr-ray compare runs methods in parallel) never each hold part of what they need and wait forever.
        bundle = {"CPU": cfg.cpus_per_actor} | ({"GPU": cfg.gpus_per_actor} if cfg.gpus_per_actor else {})
        self.placement = placement_group([bundle] * cfg.num_actors, strategy="PACK")
        ray.get(self.placement.ready())
        actor_cls = ray.remote(
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor,
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_task_retries,
        )(GeneratorWorker)
        kwargs = backend_kwargs(cfg, model_dir, seed)
        self.actors = [actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.placement, placement_group_bundle_index=i)).remote(cfg.backend, kwargs, model_ref)
            for i in range(cfg.num_actors)]
        ray.get([a.pid.remote() for a in self.actors])  # fail here, not mid-run, if a backend cannot load

    def actor_pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def generate(self, requests: list[Request], params: SamplingParams,
                 on_batch: Callable[[int], None] | None = None) -> list[list[Completion]]:
        """n completions per request in request order; ``on_batch(rows_done)`` reports progress."""
        size = self.cfg.batch_size
        batches = [requests[s : s + size] for s in range(0, len(requests), size)]

        def submit(actor: Any, batch_id: int) -> ray.ObjectRef:
            # Each batch gets its own seed so a retried batch samples exactly what the first try would.
            batch_params = dataclasses.replace(params, seed=params.seed * 1_000_003 + batch_id)
            return actor.generate.remote(batch_id, batches[batch_id], batch_params)

        progress = (lambda _i, outs: on_batch(len(outs))) if on_batch else None
        results = self._spread(submit, len(batches), progress)
        ordered = [row for outs in results for row in outs]
        if len(ordered) != len(requests):
            raise RuntimeError(f"generator pool returned {len(ordered)} rows for {len(requests)} requests")
        return ordered

    def with_model(self, fn: ModelFn, arg_batches: list[tuple], on_result: Callable[[int, Any], None] | None = None,
                   ) -> list[Any]:
        """``fn(model, tokenizer, *args)`` for each args tuple, spread over the actors; results in input order.

        For work that needs the raw transformers model (e.g. decoding from input embeddings) on the actors'
        devices instead of the driver's. ``fn`` must be deterministic: a retried call must give the same result.
        """
        return self._spread(lambda actor, i: actor.with_model.remote(i, fn, *arg_batches[i]), len(arg_batches),
                            on_result)

    def drop_model_copies(self) -> None:
        """Free the transformers copies ``with_model`` loaded beside an engine that hides its model."""
        ray.get([a.drop_model_copy.remote() for a in self.actors])

    def _spread(self, submit: Callable[[Any, int], ray.ObjectRef], n: int,
                on_result: Callable[[int, Any], None] | None) -> list[Any]:
        """Run calls 0..n-1 (``submit(actor, i)`` returns a ref to ``(i, result)``) as actors free up."""
        pending = deque(range(n))
        results: dict[int, Any] = {}
        inflight: dict[ray.ObjectRef, Any] = {}
        idle = deque(self.actors * 2)  # two batches per actor keep it busy while one result transfers
        while pending or inflight:
            while pending and idle:
                actor = idle.popleft()
                inflight[submit(actor, pending.popleft())] = actor
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(ready[0])
            try:
                i, out = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                raise RuntimeError(
                    f"a generator actor died and its batch could not be retried "
                    f"(max_restarts={self.cfg.max_restarts}, max_task_retries={self.cfg.max_task_retries}): "
                    f"{str(exc).splitlines()[0]}"
                ) from exc
            results[i] = out
            idle.append(actor)
            if on_result:
                on_result(i, out)
        return [results[i] for i in range(n)]

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.placement is not None:
            remove_placement_group(self.placement)
            self.placement = None
