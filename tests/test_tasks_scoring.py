"""Scorer.loglik on the tiny model: equals a direct teacher-forced sum, and an adapter changes it."""

from pathlib import Path

import pytest
import torch

from rr_ray.evaluation.scoring import Scorer, likelihood_score
from rr_ray.generation.base import SamplingParams
from rr_ray.models.loader import apply_chat

PROMPTS = ["Write a function.", "Hi", "Tell me a story about a dragon."]
CONTS = [" def f(x):\n    return x", " Hello there!", " Once upon a time"]


@pytest.fixture(scope="module")
def scorer(tiny_model_dir: Path) -> Scorer:
    return Scorer.from_model_dir(tiny_model_dir, batch_size=2, threads=1)


def _direct(scorer: Scorer, prompt: str, cont: str, chat: bool) -> tuple[float, int]:
    tok, model = scorer.generator.tokenizer, scorer.generator.model
    ctx = tok(apply_chat(tok, prompt) if chat else prompt, add_special_tokens=False)["input_ids"]
    tgt = tok(cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + tgt])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    nll = -sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(tgt))
    return nll, len(tgt)


@pytest.mark.parametrize("chat", [True, False])
def test_loglik_equals_direct_teacher_forcing(scorer: Scorer, chat: bool) -> None:
    got = scorer.loglik(PROMPTS, CONTS, chat=chat)  # batch 2 over 3 rows: padding and batching exercised
    for (nll, n), prompt, cont in zip(got, PROMPTS, CONTS):
        ref_nll, ref_n = _direct(scorer, prompt, cont, chat)
        assert n == ref_n
        assert nll == pytest.approx(ref_nll, rel=1e-4, abs=1e-3)


def test_empty_prompt_scores_from_second_token(scorer: Scorer) -> None:
    (nll, n), = scorer.loglik([""], ["one two three four"], chat=False)
    tokens = scorer.generator.tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    assert n == len(tokens) - 1 and nll > 0


def test_adapter_changes_loglik_and_base_is_unchanged(scorer: Scorer, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(str(scorer.generator.model.config._name_or_path))
    peft_model = get_peft_model(base_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")
    before = scorer.loglik(PROMPTS, CONTS)
    with_adapter = scorer.loglik(PROMPTS, CONTS, adapter=str(tmp_path / "lora"))
    after = scorer.loglik(PROMPTS, CONTS)
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(with_adapter, before))
    assert [round(a[0], 4) for a in after] == [round(b[0], 4) for b in before]
    mean = scorer.mean_token_loglik(PROMPTS, CONTS)
    assert mean == pytest.approx(-sum(x for x, _ in before) / sum(n for _, n in before))
    assert 0 < likelihood_score(mean) <= 1


def test_generate_returns_n_texts(scorer: Scorer) -> None:
    outs = scorer.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, temperature=1.0, n=3), chat=False)
    assert [len(o) for o in outs] == [3, 3] and all(isinstance(t, str) for o in outs for t in o)


def test_base_generation_after_an_adapter_was_loaded_is_still_base(scorer: Scorer, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    params = SamplingParams(max_new_tokens=6)
    before = scorer.generate(PROMPTS, params)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(scorer.generator.model.config._name_or_path)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "lora2")
    scorer.generate(PROMPTS, params, adapter=str(tmp_path / "lora2"))
    assert scorer.generate(PROMPTS, params) == before
