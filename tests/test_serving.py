"""The OpenAI-compatible Ray Serve app, on a local Ray, over real HTTP with the official ``openai`` client.

Served: the tiny random Llama as ``tiny-base`` and, as ``tiny``, the same model with a random LoRA (so the two
really differ). Greedy answers are checked against HFGenerator run in this process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.procs import free_port

openai = pytest.importorskip("openai")

NAME, BASE = "tiny", "tiny-base"
LIMITS = {"max_tokens_limit": 64, "default_max_tokens": 32, "max_prompt_tokens": 200, "max_n": 3}


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    from benchmarks.serve_load import random_lora

    return random_lora(tiny_model_dir, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Path, lora_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A finished run as the server reads it: run.yaml naming the base model, the composed LoRA under export/."""
    from rr_ray.storage import RunDir

    root = tmp_path_factory.mktemp("run")
    run = RunDir.open(str(root))
    run.write_text("run.yaml", f"model:\n  name_or_path: {tiny_model_dir}\n")
    run.upload_dir(lora_dir, "export/composed_lora")
    return str(root)


@pytest.fixture(scope="module")
def server(ray_local, run_dir: str):
    from ray import serve

    from rr_ray.serving.app import serve_run

    port = free_port()
    url = serve_run(run_dir, port=port, blocking=False, app_name="rr-ray-test", served_name=NAME, num_cpus=0.5,
                    max_batch_size=16, **LIMITS)
    assert url == f"http://127.0.0.1:{port}/v1"
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    from rr_ray.generation.hf_generator import HFGenerator

    return HFGenerator(tiny_model_dir, threads=1)


def test_adapter_and_model_from_run(tmp_path: Path, lora_dir: str, s3_server: str, s3_uri: str) -> None:
    from rr_ray.serving.app import build_app
    from rr_ray.serving.sources import adapter_from_run, model_from_run
    from rr_ray.storage import RunDir

    local = RunDir.open(str(tmp_path / "run"))
    assert adapter_from_run(local.uri) is None and model_from_run(local.uri) is None
    local.upload_dir(lora_dir, "release/composed")
    assert adapter_from_run(local.uri) == str(tmp_path / "run" / "release" / "composed")
    local.upload_dir(lora_dir, "export/composed_lora")  # the export wins over the release stage's copy
    assert adapter_from_run(local.uri) == str(tmp_path / "run" / "export" / "composed_lora")

    remote = RunDir.open(s3_uri, endpoint_url=s3_server)
    remote.upload_dir(lora_dir, "export/composed_lora")
    remote.write_text("run.yaml", "model:\n  name_or_path: smollm2-135m-instruct\n")
    got = Path(adapter_from_run(s3_uri, s3_server, cache_dir=str(tmp_path / "cache")))
    assert got.is_relative_to(tmp_path / "cache")
    assert (got / "adapter_config.json").read_bytes() == (Path(lora_dir) / "adapter_config.json").read_bytes()
    assert model_from_run(s3_uri, s3_server) == "smollm2-135m-instruct"

    with pytest.raises(ValueError, match="give a model"):
        build_app({})
    with pytest.raises(ValueError, match="both"):
        build_app({"model": "m", "served_name": "x", "base_name": "x"})


def _greedy(reference, prompt: str, adapter: str | None, max_tokens: int, chat: bool = True) -> str:
    from rr_ray.generation.base import Request, SamplingParams

    return reference.generate([Request(prompt, chat=chat, adapter=adapter)],
                              SamplingParams(max_new_tokens=max_tokens))[0][0].text


def test_models_and_health(server: str, client) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [NAME, BASE]
    assert all(m.object == "model" for m in models)
    health = requests.get(f"{server}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    from ray import serve

    assert serve.status().applications["rr-ray-test"].status == "RUNNING"


def test_chat_matches_local_generation_for_both_names(client, reference, lora_dir: str) -> None:
    prompts = ["Tell me a story.", "What is two plus two?", "List three fruits."]
    got: dict[str, list[str]] = {NAME: [], BASE: []}
    for model, adapter in ((NAME, lora_dir), (BASE, None)):
        for p in prompts:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                               max_tokens=12, temperature=0)
            assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.created > 0
            assert r.model == model and len(r.choices) == 1
            choice = r.choices[0]
            assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
            assert 0 < r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
            assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
            assert choice.message.content == _greedy(reference, p, adapter, 12)
            got[model].append(choice.message.content)
    assert got[NAME] != got[BASE], "the LoRA should change at least one greedy answer"


def test_completion_and_streaming_equal_non_streaming(client, reference, lora_dir: str) -> None:
    prompt = "Once upon a time"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == _greedy(reference, prompt, lora_dir, 20, chat=False)

    parts, finish, usage = [], None, None
    for chunk in client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(parts) == r.choices[0].text and finish == r.choices[0].finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens
    assert len([p for p in parts if p]) > 1, "tokens should arrive incrementally, not in one chunk"

    messages = [{"role": "user", "content": "Describe the sea."}]
    full = client.chat.completions.create(model=BASE, messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=BASE, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_raw_sse_framing(server: str) -> None:
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 5, "temperature": 0, "stream": True}
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [e for e in resp.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_n_seed_and_stop(client) -> None:
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": "Say something."}], max_tokens=16,
                  temperature=1.0, top_p=0.95, seed=7, n=3)
    a, b = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2] and a.usage.completion_tokens > 0
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # same seed

    greedy = client.completions.create(model=BASE, prompt="The", max_tokens=30, temperature=0).choices[0].text
    stop = next(greedy[i : i + 3] for i in range(4, len(greedy) - 3) if greedy[i : i + 3].strip())
    cut = client.completions.create(model=BASE, prompt="The", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[: greedy.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=BASE, prompt="The", max_tokens=30, temperature=0, stop=[stop], stream=True) if c.choices)
    assert streamed == cut.choices[0].text


def _post(server: str, path: str, data: str | dict) -> requests.Response:
    if isinstance(data, dict):
        return requests.post(f"{server}{path}", json=data, timeout=60)
    return requests.post(f"{server}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.parametrize("path,body,status,code", [
    ("/v1/chat/completions", '{"model": "tiny", "messages": [', 400, "invalid_json"),
    ("/v1/chat/completions", {"model": NAME}, 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model_not_found"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65},
     400, "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
     400, "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 4}, 400,
     "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "word " * 300}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": NAME, "prompt": "x" * 100_000}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 0}, 400, "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": [1, 2, 3]}, 400, "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 2}, 400, "unsupported_parameter"),
    ("/v1/nothing", {}, 404, "not_found"),
])
def test_bad_requests_get_openai_errors(server: str, path: str, body, status: int, code: str) -> None:
    resp = _post(server, path, body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["type"] and err["message"]


def test_client_errors_then_server_still_serves(client) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=10_000)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_fifty_concurrent_clients_without_errors(server: str) -> None:
    from benchmarks.serve_load import run_load

    result = run_load(f"{server}/v1", [NAME, BASE], clients=50, duration_s=8.0, max_tokens=8, stream_every=4)
    print("load:", result)
    assert result["errors"] == 0, result["error_examples"]
    assert result["requests"] >= 50  # every client finished at least one request
