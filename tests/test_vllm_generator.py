"""The vllm backend: real engine on a CUDA GPU with the gpu extra; skipped, with the reason, elsewhere."""

import importlib.util
from pathlib import Path

import pytest

from rr_ray.generation.base import make_generator

pytestmark = pytest.mark.gpu


def _skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'rr-ray[gpu]' on a GPU machine)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


def test_importing_rr_ray_never_imports_vllm() -> None:
    import subprocess
    import sys

    code = ("import sys, rr_ray.cli, rr_ray.pipeline, rr_ray.generation.pool; "
            "print('vllm' in sys.modules, 'deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_vllm_matches_contract_with_lora(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rr_ray.generation.base import Request, SamplingParams

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    gen = make_generator("vllm", model_dir=str(tiny_model_dir), dtype="float32", max_lora_rank=8,
                         gpu_memory_utilization=0.3)
    prompts = ["Hello", "Write a function.", "2+2?"]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    plain = gen.generate([Request(p) for p in prompts], params)
    assert [len(g) for g in plain] == [1, 1, 1] and all(g[0].num_tokens == 8 for g in plain)
    edited = gen.generate([Request(p, adapter=str(tmp_path / "adapter")) for p in prompts], params)
    assert [g[0].text for g in edited] != [g[0].text for g in plain]
    sampled = gen.generate([Request("Hello")], SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=1))
    assert len(sampled[0]) == 3
