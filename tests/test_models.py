"""Model references: local directory, s3:// URI (real S3 server), hub id offline, the packaged default."""

from pathlib import Path

import pytest
import torch

from rr_ray.models import ModelNotFoundError, load_model, load_tokenizer, resolve_model
from rr_ray.models.loader import describe_model
from rr_ray.storage import RunDir
from tests.conftest_s3 import S3_BUCKET


def _logits(model_dir: Path, text: str = "def add(a, b):") -> torch.Tensor:
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def test_local_directory_is_used_in_place(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_model_dir), cache_dir=str(tmp_path)) == tiny_model_dir
    info = describe_model(tiny_model_dir)
    assert info["architecture"] == "LlamaForCausalLM" and info["layers"] == 2
    assert info["parameters"] == sum(p.numel() for p in load_model(tiny_model_dir).parameters())


def test_local_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not an HF model directory"):
        resolve_model(str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_s3_uri_downloads_once_and_loads(s3_server: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    uri = f"s3://{S3_BUCKET}/models/tiny"
    RunDir.open(uri, endpoint_url=s3_server).upload_dir(tiny_model_dir, "")
    local = resolve_model(uri, cache_dir=str(tmp_path), s3_endpoint_url=s3_server)
    assert local.is_relative_to(tmp_path)
    assert torch.equal(_logits(local), _logits(tiny_model_dir))
    stamp = (local / "config.json").stat().st_mtime_ns
    assert resolve_model(uri, cache_dir=str(tmp_path), s3_endpoint_url=s3_server) == local
    assert (local / "config.json").stat().st_mtime_ns == stamp  # cached, not fetched again


def test_s3_prefix_without_model_is_a_clear_error(s3_server: str, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(f"s3://{S3_BUCKET}/nothing-here", cache_dir=str(tmp_path), s3_endpoint_url=s3_server)


def test_hub_id_offline_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("meta-llama/Meta-Llama-3-8B-Instruct", cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "could not be fetched" in msg and "offline" in msg and "\n" not in msg


@pytest.mark.e2e
def test_packaged_default_converts_once_with_identical_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rr_ray.models.packaged import gguf_path

    local = resolve_model("smollm2-135m-instruct")
    assert (local / "model.safetensors").is_file() and (local / "tokenizer.json").is_file()
    gguf = gguf_path("smollm2-135m-instruct")
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    text = "def fibonacci(n):"
    assert load_tokenizer(local)(text)["input_ids"] == ref_tok(text)["input_ids"]
    with torch.no_grad():
        expected = ref(**ref_tok(text, return_tensors="pt")).logits
    assert torch.equal(_logits(local, text), expected)
    assert describe_model(local)["parameters"] == 134_515_008
