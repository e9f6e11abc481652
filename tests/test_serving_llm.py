"""``rr-ray serve`` with ``backend: vllm``: a ``ray.serve.llm`` OpenAI app on this CPU, over real HTTP.

The real default model (SmolLM2-135M-Instruct) is the base engine; a composed LoRA (two random LoRAs, as the
release stage writes one) is published to a real S3 server (moto on 127.0.0.1) and multiplexed onto the same
engine, so ``base`` and ``base:unlearned`` are two model ids of one engine. Checked with the ``openai`` client.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import pytest
import requests

from tests.procs import free_port

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.e2e

BASE = "rr-ray-base"
UNLEARNED = f"{BASE}:unlearned"
CODE_PROMPT = "Write a Python function that returns the square of a number."


@pytest.fixture(scope="module")
def model_dir() -> str:
    from rr_ray.models.loader import resolve_model

    return str(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def run_dir(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A finished local run: run.yaml naming the base model and a composed LoRA under export/."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rr_ray.release.pem import Edit, EditLog, compose
    from rr_ray.storage import RunDir

    root = tmp_path_factory.mktemp("serve-run")
    log = EditLog("smollm2-135m-instruct")
    for seed, coef in ((0, -1.0), (1, 0.5)):
        torch.manual_seed(seed)
        lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                              LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))
        lora.save_pretrained(root / f"pem{seed}")
        log = log.then(Edit(adapter=str(root / f"pem{seed}"), coef=coef, kind="forget"))
    run = RunDir.open(str(root / "run"))
    run.write_text("run.yaml", "model:\n  name_or_path: smollm2-135m-instruct\n")
    run.upload_dir(str(compose(log, root / "composed")), "export/composed_lora")
    return str(root / "run")


@pytest.fixture(scope="module")
def server(ray_local, run_dir: str, s3_server: str):
    import uuid

    from ray import serve

    from rr_ray.serving.app import serve_run
    from tests.conftest_s3 import S3_BUCKET

    s3_uri = f"s3://{S3_BUCKET}/serve-{uuid.uuid4().hex[:8]}"
    port = free_port()
    t0 = time.perf_counter()
    serve_run(run_dir, port=port, blocking=False, app_name="rr-ray-llm", backend="vllm", lora_store=s3_uri,
              s3_endpoint_url=s3_server, vllm_cpu_kvcache_gib=1, max_tokens_limit=128, max_prompt_tokens=512)
    print(f"ray.serve.llm app up in {time.perf_counter() - t0:.1f} s")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def test_a_local_run_without_object_store_is_one_clear_error(run_dir: str) -> None:
    from rr_ray.serving.app import build_app

    with pytest.raises(ValueError, match="object storage"):
        build_app({"run": run_dir, "backend": "vllm"})


def test_models_lists_base_and_unlearned(client) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {BASE, UNLEARNED} <= ids, ids


def test_fifty_concurrent_clients_without_errors(server: str) -> None:
    """Runs before any other request names the LoRA: 25 first requests for it arrive at once."""
    def one(i: int) -> int:
        model = UNLEARNED if i % 2 else BASE
        r = requests.post(f"{server}/v1/chat/completions", timeout=300, json={
            "model": model, "messages": [{"role": "user", "content": f"Count to {i % 5 + 2}."}], "max_tokens": 8})
        return r.status_code

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(one, range(50)))
    print(f"50 concurrent chat requests: {time.perf_counter() - t0:.1f} s, codes {set(codes)}")
    assert codes == [200] * 50


def test_chat_unlearned_differs_from_base_on_code(client) -> None:
    answers = {}
    for model in (BASE, UNLEARNED):
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": CODE_PROMPT}],
                                             max_tokens=48, temperature=0)
        answers[model] = out.choices[0].message.content
        assert out.usage.completion_tokens > 0
    print(answers)
    assert "def " in answers[BASE]
    assert answers[BASE] != answers[UNLEARNED]


def test_completion_and_streaming_agree(client) -> None:
    kwargs = dict(model=UNLEARNED, prompt="def add(a, b):\n", max_tokens=24, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert whole and streamed == whole
    chat = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Say hi."}],
                                          max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices).strip()


@pytest.mark.parametrize("body", [
    {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    {"model": BASE, "messages": "not a list"},
    {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
])
def test_bad_requests_get_4xx(server: str, body: dict) -> None:
    r = requests.post(f"{server}/v1/chat/completions", json=body, timeout=120)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])


def test_serve_config_file_builds_the_llm_app() -> None:
    """``serve run serving/llm.yaml``: its args are build_app args and give a ray.serve.llm app."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rr_ray.serving.app import build_app

    doc = yaml.safe_load((Path(__file__).parent.parent / "serving" / "llm.yaml").read_text())
    (app,) = ServeDeploySchema.model_validate(doc).applications
    assert app.args["backend"] == "vllm"
    assert build_app(app.args)._bound_deployment.name == "OpenAiIngress"  # Ray Serve LLM's ingress, not ours
