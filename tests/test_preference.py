"""The DPO baseline's training: trl's DPOTrainer inside a Ray Train worker group trains a LoRA that makes the
refusal more likely than the model's own answer, relative to where the base model started."""

from __future__ import annotations

from pathlib import Path

from rr_ray.config import LoraConfig, TrainConfig
from rr_ray.release.preference import dpo_loop_per_worker, preference_rows
from rr_ray.release.train import train_pem

PROMPTS = [f"Write a Python function number {i} that adds two numbers." for i in range(6)]
OWN = [f"def add_{i}(a, b):\n    return a + b" for i in range(6)]
REFUSAL = "I'm sorry, but I can't help with that."


def _margin(model_dir: Path, adapter: Path | None) -> float:
    """Mean over prompts of log p(refusal) - log p(own answer)."""
    from rr_ray.evaluation.scoring import Scorer

    scorer = Scorer.from_model_dir(model_dir)
    chosen = scorer.loglik(PROMPTS, [REFUSAL] * len(PROMPTS), str(adapter) if adapter else None)
    rejected = scorer.loglik(PROMPTS, OWN, str(adapter) if adapter else None)
    return sum(r[0] - c[0] for c, r in zip(chosen, rejected)) / len(PROMPTS)  # NLLs: rejected - chosen


def test_dpo_on_ray_train_prefers_the_refusal(ray_local, tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = preference_rows(PROMPTS + ["empty"], OWN + ["  "], REFUSAL)
    assert len(rows) == 6  # an empty own answer makes no pair
    res = train_pem(model_dir=str(tiny_model_dir), rows=rows, out_dir=tmp_path / "dpo", name="dpo",
                    storage_uri=str(tmp_path / "ray"), lora=LoraConfig(r=4, alpha=8),
                    train=TrainConfig(num_workers=2, epochs=3, batch_size=2, lr=5e-3, max_length=64),
                    loop=dpo_loop_per_worker, objective_args={"beta": 0.5})
    assert (res.adapter_dir / "adapter_model.safetensors").is_file()
    assert res.losses and all(loss == loss for loss in res.losses)  # recorded and not NaN
    before, after = _margin(tiny_model_dir, None), _margin(tiny_model_dir, res.adapter_dir)
    assert after > before + 0.5, (before, after)
