"""What a LoRA is trained to do, as one loss per batch.

``nll``: the causal-LM loss on response tokens, which every PEM of Release is trained with (section 3.2; the
PEM is subtracted afterwards, so it *learns* the forget data). The gradient baselines of the open-unlearning
family instead train a LoRA that is applied as it is (+1) and unlearns by its loss:

- ``graddiff`` (gradient difference): ascend the forget rows' NLL, descend the retain rows' NLL.
- ``npo`` (Zhang et al. 2024, "Negative Preference Optimization"): on forget rows
  ``-(2/beta) log sigmoid(-beta log(pi_theta(y|x) / pi_ref(y|x)))``, a bounded form of ascent whose reference
  pi_ref is the frozen model under the LoRA (the adapter switched off); retain rows keep their NLL.

Rows carry ``forget`` (1) or retain (0) in the batch; per-sequence losses are averaged over the batch.

Only the positions that predict a labelled token go through the LM head (``logits_to_keep``): with right
padding they are the batch's tail from its earliest response token, and the prompt's logits, a vocabulary-wide
tensor per token (Qwen2.5's 151,936 entries) and the largest share of a training step's memory, are never made.
"""

from __future__ import annotations

from typing import Any

OBJECTIVES = ("nll", "npo", "graddiff")


def sequence_nll(logits: Any, labels: Any) -> tuple[Any, Any]:
    """(summed NLL, scored tokens) per sequence of the labelled (non -100) next-token positions."""
    import torch
    import torch.nn.functional as F

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.clamp(min=0).reshape(-1), reduction="none")
    nll = (nll.view(labels.shape) * mask).sum(dim=1)
    return nll, mask.sum(dim=1).clamp(min=1).to(torch.float32)


def labelled_nll(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """``sequence_nll`` of ``model`` on ``batch``, with logits only from the position before the earliest
    labelled token on (right-padded rows: every labelled position lies in that tail)."""
    labels = batch["labels"]
    labelled = (labels != -100).any(dim=0).nonzero()
    length = labels.size(1)
    keep = length - max(int(labelled[0]) - 1, 0) if len(labelled) else 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return sequence_nll(logits, labels[:, length - keep:])


def objective_loss(forward: Any, inner: Any, batch: dict[str, Any], objective: str, beta: float = 0.1,
                   retain_weight: float = 1.0) -> Any:
    """The batch loss of ``objective``. ``forward`` is what the optimiser steps through (the model, its DDP
    wrapper or a DeepSpeed engine); ``inner`` the PeftModel itself, whose adapter NPO switches off for pi_ref.
    ``nll`` is the mean over the batch's labelled tokens (the causal-LM loss transformers computes)."""
    import torch
    import torch.nn.functional as F

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: use one of {OBJECTIVES}")
    nll, tokens = labelled_nll(forward, batch)
    if objective == "nll":
        return nll.sum() / (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
    forget = batch["forget"].bool()
    retain_term = retain_weight * nll / tokens
    if objective == "graddiff":
        forget_term = -nll / tokens
    else:
        with torch.no_grad(), inner.disable_adapter():
            ref_nll, _ = labelled_nll(inner, batch)
        log_ratio = ref_nll - nll  # log pi_theta(y|x) - log pi_ref(y|x), summed over the response tokens
        forget_term = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio)
    return torch.where(forget, forget_term, retain_term).mean()


def orthogonal_a(peft_model: Any, previous: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(trainable lora_A, previous PEM's A) pairs of the modules both adapt; ``previous``: module path -> A
    (``pem.read_lora(...).modules`` of each earlier forget PEM, their A blocks stacked by row)."""
    pairs = []
    for name, param in peft_model.named_parameters():
        if not (param.requires_grad and name.endswith(".lora_A.default.weight")):
            continue
        path = name.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
        if path in previous:
            pairs.append((param, previous[path].to(param.device, param.dtype)))
    return pairs


def orthogonality_penalty(pairs: list[tuple[Any, Any]]) -> Any:
    """O-LoRA's regulariser (Wang et al. 2023), as the paper's Appendix B applies it to the retain PEM:
    sum over modules of ||A_new A_prev^T||_F^2, zero when the new PEM reads inputs in a subspace orthogonal to
    the one every earlier forget PEM reads."""
    return sum((a_new @ a_prev.T).pow(2).sum() for a_new, a_prev in pairs)
