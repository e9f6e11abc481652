"""PEM training (paper section 3.2): one LoRA trained with the causal-LM loss on response tokens, on top of
the current composed model held frozen, as a Ray Train ``TorchTrainer`` run.

Strategies (config ``release.train.strategy``): ``ddp`` (torch DDP over CPU or GPU workers, the CPU default)
and ``deepspeed`` (ZeRO stage 0-2 from our config, on GPUs or on DeepSpeed's CPU accelerator; the ``gpu`` or
``deepspeed`` extra; stage 3 is refused at config load since checkpoints are saved from rank 0). Each epoch ends with a checkpoint
reported through Ray Train; a worker that dies makes Ray Train restart the group (``FailureConfig``) and the
loop resumes from the last checkpoint. A driver killed and rerun with the same run directory resumes too:
Ray Train V2 reloads the run's checkpoint snapshot from ``storage_path`` when the run name matches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rr_ray.config import LoraConfig, TrainConfig
from rr_ray.storage import arrow_storage, localize

STATE_FILE = "train_state.pt"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    steps: int
    final_loss: float
    losses: list[float]
    attempts: int  # > 1 when the loop resumed from a checkpoint (worker failure or driver rerun)
    seconds: float


def tokenize_rows(tokenizer: Any, rows: list[dict[str, str]], max_length: int) -> list[dict[str, Any]]:
    """Chat-rendered prompt + response + EOS; labels mask the prompt so only response tokens are learned.
    ``forget`` is 0 for rows of ``kind: retain`` (the two-sided objectives of ``objectives.py``), else 1.

    Over ``max_length``, the response keeps up to all but half the budget and the prompt loses its start:
    cutting from the right would drop the response of a long-prompt row, which then trains nothing."""
    from rr_ray.models.loader import apply_chat

    out, cut = [], 0
    for row in rows:
        ctx = tokenizer(apply_chat(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"]
        tgt = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ctx) + len(tgt) > max_length:
            cut += 1
            tgt = tgt[:max_length - min(len(ctx), max_length // 2)]
            ctx = ctx[len(ctx) - (max_length - len(tgt)):]
        out.append({"input_ids": ctx + tgt, "labels": [-100] * len(ctx) + tgt,
                    "forget": int(row.get("kind") != "retain")})
    if cut:
        logger.warning("%d of %d training rows exceed max_length=%d tokens: their prompts lose their start",
                       cut, len(rows), max_length)
    return out


def _collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    forget = torch.tensor([b.get("forget", 1) for b in batch], dtype=torch.long)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "forget": forget}


def _stacked_a(adapters: list[str], endpoint_url: str | None) -> dict[str, Any]:
    """Module path -> the A blocks of every adapter in ``adapters`` stacked by row (float32)."""
    import torch

    from rr_ray.release.pem import read_lora

    blocks: dict[str, list[Any]] = {}
    for uri in adapters:
        for name, (a, _, _) in read_lora(localize(uri, endpoint_url=endpoint_url)).modules.items():
            blocks.setdefault(name, []).append(a.float())
    return {name: torch.cat(parts, dim=0) for name, parts in blocks.items()}


def build_trainable(model_dir: str, base_adapter: str | None, lora: LoraConfig, dtype: str) -> Any:
    """Base + current edit log (frozen) with a fresh trainable LoRA.

    The composed adapter is folded into this process's in-memory copy of the weights: the frozen model the
    new PEM sees is exactly base + edit log, and nothing merged is ever written (DESIGN.md: merging is for
    export only). The returned PeftModel has only the new LoRA trainable.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    from rr_ray.models.loader import DTYPES, load_model, resolve_dtype

    # The edit log is merged in fp32 and only then cast: scoring applies it unmerged (in the LoRA's fp32), and a
    # bf16 merge would round each weight's small delta away.
    model = load_model(model_dir, "float32" if base_adapter else dtype)
    if base_adapter:
        model = PeftModel.from_pretrained(model, base_adapter).merge_and_unload()
        model = model.to(DTYPES[resolve_dtype(dtype)])
    for p in model.parameters():
        p.requires_grad_(False)
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                              lora_dropout=lora.dropout, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def _deepspeed_config(train: TrainConfig, world: int, dtype: str) -> dict[str, Any]:
    """ZeRO from our config; mixed precision only when the model is loaded in that dtype (fp32 trains in fp32).
    On CPU (DeepSpeed's CPU accelerator, on the gloo group Ray Train set up) the fused CUDA Adam and
    communication overlap do not exist: torch's AdamW and plain ZeRO-2 reductions are used."""
    on_gpu = train.use_gpu
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "train_batch_size": train.batch_size * world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": train.zero_stage, "overlap_comm": on_gpu, "contiguous_gradients": on_gpu},
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": 0.0, "torch_adam": not on_gpu}},
    }
    if dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "float16":
        cfg["fp16"] = {"enabled": True}
    return cfg


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: shard the rows by rank, train the LoRA, report loss + a checkpoint every epoch."""
    import ray.train
    import torch

    from rr_ray.models.loader import load_tokenizer, resolve_dtype, resolve_model
    from rr_ray.release.objectives import objective_loss, orthogonal_a, orthogonality_penalty

    train = TrainConfig.model_validate(config["train"])
    lora = LoraConfig.model_validate(config["lora"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not train.use_gpu:
        torch.set_num_threads(max(1, int(config.get("threads", 1))))
    torch.manual_seed(config["seed"])

    # Workers may sit on other nodes than the driver: they resolve the model and fetch the adapter themselves.
    model_dir = str(resolve_model(config["model_dir"], config.get("cache_dir"), config.get("endpoint_url")))
    base_adapter = config.get("base_adapter")
    if base_adapter:
        base_adapter = str(localize(base_adapter, endpoint_url=config.get("endpoint_url")))
    tokenizer = load_tokenizer(model_dir, padding_side="right")
    rows = tokenize_rows(tokenizer, config["rows"], train.max_length)
    model = build_trainable(model_dir, base_adapter, lora, config["dtype"])
    params = [p for p in model.parameters() if p.requires_grad]
    ortho_weight, ortho_pairs = float(config.get("orthogonality", 0.0)), []
    if ortho_weight > 0 and config.get("orthogonal_to"):
        ortho_pairs = orthogonal_a(model, _stacked_a(config["orthogonal_to"], config.get("endpoint_url")))

    start_epoch, losses, resumes = 0, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # restarted after a failure, or a rerun of a killed driver
        with checkpoint.as_directory() as ckpt:
            state = torch.load(Path(ckpt) / STATE_FILE, weights_only=True)
        model.load_state_dict(state["lora"], strict=False)
        start_epoch, losses, resumes = state["epoch"], list(state["losses"]), state["resumes"] + 1

    if train.strategy == "deepspeed":
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                               config=_deepspeed_config(train, world, resolve_dtype(config["dtype"])))
        device = engine.device
        step_fn = engine
    else:
        model = ray.train.torch.prepare_model(model)
        device = next(model.parameters()).device
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=0.0)
        if checkpoint:
            optimizer.load_state_dict(state["optimizer"])
        step_fn = None

    for epoch in range(start_epoch, train.epochs):
        order = list(range(len(rows)))
        random.Random(config["seed"] * 1009 + epoch).shuffle(order)
        shard = order[rank::world]
        # Every rank runs the same number of steps: DDP's all-reduce needs all of them at each step.
        steps = math.ceil(len(rows) / (world * train.batch_size))
        model.train()
        total, count = 0.0, 0
        for step in range(steps):
            idx = shard[step * train.batch_size:(step + 1) * train.batch_size] or shard[: train.batch_size]
            batch = {k: v.to(device) for k, v in _collate([rows[i] for i in idx], tokenizer.pad_token_id).items()}
            inner = model.module if hasattr(model, "module") else model
            loss = objective_loss(model if step_fn is None else step_fn, inner, batch, config.get("objective", "nll"),
                                  **config.get("objective_args", {}))
            if ortho_pairs:
                loss = loss + ortho_weight * orthogonality_penalty(ortho_pairs)
            if step_fn is not None:
                step_fn.backward(loss)
                step_fn.step()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total, count = total + float(loss.detach()), count + 1
        losses.append(total / max(count, 1))
        metrics = {"epoch": epoch + 1, "loss": losses[-1], "rows": len(rows), "world_size": world}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                inner = model.module if hasattr(model, "module") else model
                lora_state = {k: v.detach().cpu() for k, v in inner.state_dict().items() if "lora_" in k}
                state = {"lora": lora_state, "epoch": epoch + 1, "losses": losses, "resumes": resumes}
                if step_fn is None:
                    state["optimizer"] = optimizer.state_dict()
                torch.save(state, Path(tmp) / STATE_FILE)
                inner.save_pretrained(Path(tmp) / "adapter")
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def train_pem(*, model_dir: str, rows: list[dict[str, str]], out_dir: str | Path, name: str,
              storage_uri: str, lora: LoraConfig, train: TrainConfig, base_adapter: str | None = None,
              dtype: str = "float32", seed: int = 0, endpoint_url: str | None = None,
              cache_dir: str | None = None, objective: str = "nll", objective_args: dict[str, float] | None = None,
              loop: Any = None, orthogonal_to: list[str] | None = None, orthogonality: float = 0.0) -> TrainResult:
    """Train one PEM with Ray Train and copy its adapter to ``out_dir``; Ray must be initialised.

    ``model_dir`` is any model reference ``resolve_model`` takes and ``base_adapter`` (the composed edit log)
    a local path or s3:// URI, so that workers on any node can load them. ``objective`` (``objectives.py``)
    is the loss; ``loop`` another worker loop with the same checkpoint layout (the DPO baseline's).
    ``orthogonality`` > 0 adds O-LoRA's penalty against the A matrices of the adapters in ``orthogonal_to``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if not rows:
        raise ValueError(f"{name}: no training rows")
    if train.strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ImportError("release.train.strategy=deepspeed needs DeepSpeed: pip install 'rr-ray[gpu]' "
                              "(or 'rr-ray[deepspeed]' on CPU)") from None
    storage_path, fs = arrow_storage(storage_uri, endpoint_url)
    config = {"train": train.model_dump(), "lora": lora.model_dump(), "rows": rows, "model_dir": str(model_dir),
              "base_adapter": base_adapter, "dtype": dtype, "seed": seed, "threads": train.cpus_per_worker,
              "endpoint_url": endpoint_url, "cache_dir": cache_dir, "objective": objective,
              "objective_args": objective_args or {}, "orthogonal_to": list(orthogonal_to or []),
              "orthogonality": orthogonality}
    resources = {"CPU": train.cpus_per_worker} | ({"GPU": 1} if train.use_gpu else {})
    trainer = TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{name}: training failed: {str(result.error).splitlines()[0]}")
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint")
    out = Path(out_dir)
    with result.checkpoint.as_directory() as ckpt:
        import torch

        state = torch.load(Path(ckpt) / STATE_FILE, weights_only=True)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(ckpt) / "adapter", tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    attempts = int(state["resumes"]) + 1
    (out / "train_info.json").write_text(json.dumps(
        {"name": name, "rows": len(rows), "epochs": train.epochs, "losses": state["losses"],
         "workers": train.num_workers, "strategy": train.strategy, "attempts": attempts}, indent=1))
    return TrainResult(adapter_dir=out, steps=int(state["epoch"]), final_loss=float(state["losses"][-1]),
                       losses=[float(x) for x in state["losses"]], attempts=attempts,
                       seconds=time.perf_counter() - t0)

