"""The hf backend on the tiny random Llama: padding, sampling, n, stop strings, per-request adapters."""

from pathlib import Path

import pytest

from rr_ray.generation.base import Request, SamplingParams, cut_at_stop
from rr_ray.generation.hf_generator import HFGenerator

PROMPTS = ["Write a function.", "Hi", "Tell me a long story about a dragon and a castle, please.", "2+2?"]


@pytest.fixture(scope="module")
def gen(tiny_model_dir: Path) -> HFGenerator:
    return HFGenerator(tiny_model_dir, dtype="float32", threads=1, batch_size=4)


def test_batched_left_padded_equals_one_at_a_time(gen: HFGenerator) -> None:
    params = SamplingParams(max_new_tokens=12)
    batched = gen.generate([Request(p) for p in PROMPTS], params)
    single = [gen.generate([Request(p)], params)[0] for p in PROMPTS]
    assert [g[0].text for g in batched] == [g[0].text for g in single]
    assert all(g[0].num_tokens <= 12 for g in batched)


def test_ignore_eos_gives_exact_budget_and_length_reason(gen: HFGenerator) -> None:
    out = gen.generate([Request(p) for p in PROMPTS], SamplingParams(max_new_tokens=9, ignore_eos=True))
    assert [g[0].num_tokens for g in out] == [9] * len(PROMPTS)
    assert {g[0].finish_reason for g in out} == {"length"}


def test_n_samples_seeded_and_reproducible(gen: HFGenerator) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=7)
    a = gen.generate([Request(p) for p in PROMPTS[:2]], params)
    b = gen.generate([Request(p) for p in PROMPTS[:2]], params)
    assert [len(g) for g in a] == [3, 3]
    assert [[c.text for c in g] for g in a] == [[c.text for c in g] for g in b]
    assert len({c.text for c in a[0]}) > 1  # sampling really samples
    other = gen.generate([Request(p) for p in PROMPTS[:2]], SamplingParams(**{**params.__dict__, "seed": 8}))
    assert [[c.text for c in g] for g in other] != [[c.text for c in g] for g in a]


def test_stop_string_cuts_output(gen: HFGenerator) -> None:
    full = gen.generate([Request(PROMPTS[0])], SamplingParams(max_new_tokens=20))[0][0].text
    assert len(full) > 12
    stop = full[6:9]
    expected = full[: full.find(stop)]
    out = gen.generate([Request(PROMPTS[0])], SamplingParams(max_new_tokens=20, stop=(stop,)))[0][0]
    assert out.text == expected
    assert out.finish_reason == "stop"


def test_cut_at_stop_takes_earliest() -> None:
    assert cut_at_stop("abc```def\nEND", ("END", "```")) == ("abc", True)
    assert cut_at_stop("abc", ("x",)) == ("abc", False)


def test_chat_template_applied_unless_raw(gen: HFGenerator) -> None:
    assert "<|im_start|>user\nHi<|im_end|>" in gen.render(Request("Hi"))
    assert gen.render(Request("Hi", chat=False)) == "Hi"


def test_adapter_per_request_in_one_mixed_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))  # random A and B: a visible edit
    lora.save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")

    gen = HFGenerator(tiny_model_dir, dtype="float32", threads=1, batch_size=8)
    params = SamplingParams(max_new_tokens=10)
    plain = [g[0].text for g in gen.generate([Request(p) for p in PROMPTS], params)]
    edited = [g[0].text for g in gen.generate([Request(p, adapter=adapter) for p in PROMPTS], params)]
    assert plain != edited
    mixed = gen.generate([Request(p, adapter=adapter if i % 2 else None) for i, p in enumerate(PROMPTS)], params)
    assert [g[0].text for g in mixed] == [edited[i] if i % 2 else plain[i] for i in range(len(PROMPTS))]
