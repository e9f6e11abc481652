"""The training objectives of ``release/objectives.py`` on a tiny model: nll is the plain causal-LM loss, NPO
starts at (2/beta) log 2 (the LoRA starts at zero, so pi_theta = pi_ref), and GradDiff/NPO steps make the forget
rows less likely while the retain rows' likelihood is trained up."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rr_ray.release.objectives import objective_loss, sequence_nll

FORGET = [{"prompt": f"Write code {i}.", "response": f"def f{i}(x):\n    return x + {i}", "kind": "forget"}
          for i in range(4)]
RETAIN = [{"prompt": f"What is {i} + 1?", "response": f"{i + 1}", "kind": "retain"} for i in range(4)]


def _setup(tiny_model_dir: Path):
    import torch
    from peft import LoraConfig, get_peft_model

    from rr_ray.models.loader import load_model, load_tokenizer
    from rr_ray.release.train import _collate, tokenize_rows

    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model_dir, padding_side="right")
    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                                                     "v_proj"]))
    batch = _collate(tokenize_rows(tok, FORGET + RETAIN, 64), tok.pad_token_id)
    return model, batch


def test_nll_is_the_causal_lm_loss_and_npo_starts_at_its_closed_form(tiny_model_dir: Path) -> None:
    import torch

    model, batch = _setup(tiny_model_dir)
    with torch.no_grad():
        nll = objective_loss(model, model, batch, "nll")
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss
        assert float(nll) == pytest.approx(float(plain), rel=1e-5)
        assert batch["forget"].tolist() == [1] * 4 + [0] * 4
        seq, tokens = sequence_nll(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        per_token = seq / tokens
        beta = 0.5
        npo = objective_loss(model, model, batch, "npo", beta=beta, retain_weight=0.0)
        # retain rows weigh 0; forget rows give -(2/beta) log sigmoid(0) = (2/beta) log 2 each
        assert float(npo) == pytest.approx(0.5 * (2 / beta) * math.log(2), rel=1e-5)
        gd = objective_loss(model, model, batch, "graddiff", retain_weight=2.0)
        expected = torch.cat([-per_token[:4], 2.0 * per_token[4:]]).mean()
        assert float(gd) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="unknown objective"):
        objective_loss(model, model, batch, "nope")


def test_nll_from_kept_logits_has_the_full_logits_gradient(tiny_model_dir: Path) -> None:
    """The loss from the response tail's logits alone trains exactly what transformers' loss trains."""
    import torch

    model, batch = _setup(tiny_model_dir)
    assert int((batch["labels"] != -100).any(dim=0).nonzero()[0]) > 1  # a prompt the tail leaves out
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    grads = []
    for loss_fn in (lambda: objective_loss(model, model, batch, "nll"),
                    lambda: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=batch["labels"]).loss):
        torch.manual_seed(1)  # the same dropout masks
        grads.append(torch.autograd.grad(loss_fn(), params))
    for kept, full in zip(*grads):
        assert torch.allclose(kept, full, rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().sum()) > 0 for g in grads[0])


@pytest.mark.parametrize("objective", ["npo", "graddiff"])
def test_unlearning_steps_lower_the_forget_likelihood_and_keep_retain(tiny_model_dir: Path, objective: str) -> None:
    import torch

    model, batch = _setup(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)

    def nlls() -> tuple[float, float]:
        with torch.no_grad():
            seq, tokens = sequence_nll(model(input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"]).logits, batch["labels"])
        per = seq / tokens
        return float(per[:4].mean()), float(per[4:].mean())

    forget0, retain0 = nlls()
    for _ in range(10):
        loss = objective_loss(model, model, batch, objective, beta=0.5)
        loss.backward()
        opt.step()
        opt.zero_grad()
    forget1, retain1 = nlls()
    assert forget1 > forget0 + 0.05  # forget rows became less likely
    assert retain1 < retain0  # the retain rows' NLL is trained down at the same time


def test_orthogonality_penalty_is_zero_for_orthogonal_inputs_and_finds_shared_modules(tiny_model_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from rr_ray.models.loader import load_model
    from rr_ray.release.objectives import orthogonal_a, orthogonality_penalty

    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    q0 = "model.layers.0.self_attn.q_proj"
    prev = {q0: torch.randn(3, 32), "model.layers.0.self_attn.v_proj": torch.randn(3, 32)}
    pairs = orthogonal_a(model, prev)
    assert len(pairs) == 1 and pairs[0][0].shape == (2, 32)
    a_new = pairs[0][0]
    expect = float((a_new.detach() @ prev[q0].T).pow(2).sum())
    assert float(orthogonality_penalty(pairs)) == pytest.approx(expect, rel=1e-5)
    with torch.no_grad():
        a_new.zero_()
        a_new[:, :16] = torch.randn(2, 16)
    ortho = {q0: torch.cat([torch.zeros(3, 16), torch.randn(3, 16)], dim=1)}
    assert float(orthogonality_penalty(orthogonal_a(model, ortho))) == 0.0
    loss = orthogonality_penalty(orthogonal_a(model, prev))
    loss.backward()
    assert a_new.grad is not None and float(a_new.grad.abs().sum()) > 0
