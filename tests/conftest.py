"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, a local Ray, an S3 server."""

from __future__ import annotations

import os

# Every Ray port on loopback, and no hub access from anything the tests start.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.conftest_s3 import s3_server, s3_uri  # noqa: E402,F401  (fixtures shared by every test module)


def build_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """A ~2 M-parameter random LlamaForCausalLM saved with the SmolLM2 tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rr_ray.models.packaged import gguf_path

    gguf = gguf_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id,
                         initializer_range=0.2)  # peaked logits: greedy outputs have no near-ties
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (2 CPUs, loopback only), shut down at the end."""
    import ray

    from rr_ray.cluster import connect
    from rr_ray.config import RayConfig

    os.environ.pop("RAY_ADDRESS", None)
    connect(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


# The slowest modules go first, so that with `pytest -n 2` (scripts/test.sh) they overlap each other and the
# many short tests fill the gaps, instead of one long test running alone at the end.
SLOW_FIRST = ("test_e2e", "test_two_nodes", "test_cluster_install", "test_compare", "test_audit", "test_release",
              "test_pipeline_s3", "test_vllm_backend", "test_serving_llm", "test_train")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    def key(item: pytest.Item) -> int:
        module = getattr(item, "module", None)
        return rank.get(module.__name__.rsplit(".", 1)[-1], len(SLOW_FIRST)) if module else len(SLOW_FIRST)

    items.sort(key=key)
