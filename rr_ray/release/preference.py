"""DPO (Rafailov et al. 2023) as a LoRA, trained with trl's ``DPOTrainer`` inside a Ray Train worker group.

The paper's DPO baseline (section 4.2, Tables 2-4): for each forget prompt the preferred answer is a refusal
and the dispreferred one is the model's own response. trl runs on the torch process group Ray Train set up
(gloo on CPU, NCCL on GPUs); the reference policy is the base model with the LoRA switched off (trl's
``peft_config`` path). The worker reports one checkpoint in ``train.py``'s layout, so ``train_pem(loop=...)``
handles storage, retries and the returned adapter exactly as for a PEM.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rr_ray.config import LoraConfig, TrainConfig
from rr_ray.release.train import STATE_FILE


def preference_rows(prompts: list[str], rejected: list[str], chosen: str) -> list[dict[str, str]]:
    """DPO rows: ``chosen`` (a refusal) preferred over each prompt's own response; empty responses dropped."""
    return [{"prompt": p, "chosen": chosen, "rejected": r} for p, r in zip(prompts, rejected) if r.strip()]


def dpo_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: DPO on this worker's shard (trl shards by rank), then rank 0 reports the adapter."""
    import ray.train
    import torch
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from trl import DPOConfig, DPOTrainer

    from rr_ray.models.loader import load_model, load_tokenizer, resolve_dtype, resolve_model

    train = TrainConfig.model_validate(config["train"])
    lora = LoraConfig.model_validate(config["lora"])
    ctx = ray.train.get_context()
    if ray.train.get_checkpoint() is not None:  # a rerun of a driver killed after training: report it again
        with ray.train.get_checkpoint().as_directory() as ckpt:
            ray.train.report({"epoch": train.epochs, "resumed": True},
                             checkpoint=ray.train.Checkpoint.from_directory(ckpt) if ctx.get_world_rank() == 0
                             else None)
        return
    if not train.use_gpu:
        torch.set_num_threads(max(1, int(config.get("threads", 1))))
    model_dir = str(resolve_model(config["model_dir"], config.get("cache_dir"), config.get("endpoint_url")))
    tokenizer = load_tokenizer(model_dir, padding_side="right")
    dtype = resolve_dtype(config["dtype"])
    model = load_model(model_dir, dtype)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                              for r in config["rows"]])
    args = config.get("objective_args", {})
    with tempfile.TemporaryDirectory(prefix="rr-ray-dpo-") as out:
        dpo_args = DPOConfig(
            output_dir=out, per_device_train_batch_size=train.batch_size, num_train_epochs=train.epochs,
            learning_rate=train.lr, beta=float(args.get("beta", 0.1)), max_length=train.max_length,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=not train.use_gpu, seed=config["seed"],
            bf16=dtype == "bfloat16", fp16=dtype == "float16", dataloader_num_workers=0, disable_tqdm=True,
            max_grad_norm=1.0)
        peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                                  lora_dropout=lora.dropout, bias="none", task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=model, args=dpo_args, train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_cfg)
        if len(trainer.train_dataset) == 0:  # trl drops pairs whose prompt alone fills max_length
            raise ValueError(f"dpo: every one of the {len(data)} prompts fills release.train.max_length="
                             f"{train.max_length} tokens; raise it")
        trainer.train()
        history = trainer.state.log_history
        losses = [float(h["loss"]) for h in history if "loss" in h]
        metrics = {"epoch": train.epochs, "loss": losses[-1] if losses else float("nan"), "rows": len(data),
                   "world_size": ctx.get_world_size(),
                   "reward_margin": next((float(h[k]) for h in reversed(history) for k in h
                                          if k.endswith("rewards/margins")), None)}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if ctx.get_world_rank() == 0:
                trainer.model.save_pretrained(Path(tmp) / "adapter")
                torch.save({"epoch": train.epochs, "losses": losses, "resumes": 0}, Path(tmp) / STATE_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
