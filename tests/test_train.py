"""PEM training on Ray Train: loss falls, the adapter loads, and a killed worker resumes from a checkpoint."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from rr_ray.config import LoraConfig, TrainConfig
from rr_ray.release.train import tokenize_rows, train_pem

ROWS = [{"prompt": f"Say the colour number {i}.", "response": f"The colour is blue {i % 3}."} for i in range(16)]


def _train(tmp: Path, name: str, epochs: int, workers: int = 2, **kw) -> object:
    return train_pem(model_dir=kw.pop("model_dir"), rows=ROWS, out_dir=tmp / f"{name}-adapter", name=name,
                     storage_uri=str(tmp / "ray-train"), lora=LoraConfig(r=4, alpha=8),
                     train=TrainConfig(num_workers=workers, epochs=epochs, batch_size=4, lr=5e-3, max_length=64),
                     seed=0, **kw)


def test_tokenize_masks_the_prompt(tiny_model_dir: Path) -> None:
    from rr_ray.models.loader import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    (row,) = tokenize_rows(tok, ROWS[:1], 256)
    learned = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tok.decode(learned).startswith("The colour is blue 0.")
    assert learned[-1] == tok.eos_token_id
    assert row["labels"][0] == -100


def test_edit_log_is_merged_in_fp32_before_the_training_dtype(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    from rr_ray.models.loader import load_model
    from rr_ray.release.train import build_trainable

    torch.manual_seed(0)
    lora = get_peft_model(load_model(tiny_model_dir), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                     init_lora_weights=False))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.mul_(1e-3)  # a small delta, as a composed edit log's is
    lora.save_pretrained(tmp_path / "edit")
    key = "model.layers.0.self_attn.q_proj.weight"
    fp32 = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / "edit").merge_and_unload()
    expected = fp32.state_dict()[key].to(torch.bfloat16)
    got = build_trainable(str(tiny_model_dir), str(tmp_path / "edit"), LoraConfig(r=4, alpha=8), "bfloat16")
    weight = got.base_model.model.state_dict()[key.replace("q_proj.weight", "q_proj.base_layer.weight")]
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, expected)
    bf16 = PeftModel.from_pretrained(load_model(tiny_model_dir, "bfloat16"), tmp_path / "edit").merge_and_unload()
    assert not torch.equal(bf16.state_dict()[key], expected)  # what a bf16 merge would have trained on


def test_train_two_ddp_workers(tiny_model_dir: Path, tmp_path: Path, ray_local) -> None:
    from peft import PeftModel

    from rr_ray.models.loader import load_model

    res = _train(tmp_path, "ddp", epochs=3, model_dir=str(tiny_model_dir))
    assert res.steps == 3 and res.attempts == 1
    assert res.losses[-1] < res.losses[0], res.losses
    model = PeftModel.from_pretrained(load_model(tiny_model_dir), res.adapter_dir)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)


def _train_workers(since: float) -> list[psutil.Process]:
    """Ray Train worker processes of this session started after ``since`` (earlier tests leave idle ones)."""
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) and proc.create_time() >= since:
                out.append(proc)
        except psutil.Error:
            pass
    return out


EPOCHS = 40


def test_killed_worker_resumes_from_checkpoint(tiny_model_dir: Path, tmp_path: Path, ray_local) -> None:
    box: dict[str, object] = {}
    started = time.time() - 1
    # Enough epochs that the kill lands mid-run: a tiny-model epoch takes well under a second.
    thread = threading.Thread(target=lambda: box.update(res=_train(tmp_path, "killed", epochs=EPOCHS,
                                                                    model_dir=str(tiny_model_dir))))
    thread.start()
    deadline = time.time() + 240
    # A checkpoint folder appears before Ray Train has committed it: wait until a third one shows up, by
    # which time the first has been committed and is what a restarted group resumes from.
    seen: set[str] = set()
    while len(seen) < 3 and time.time() < deadline:
        seen |= {p.name for p in (tmp_path / "ray-train").glob("killed/checkpoint_*")}
        time.sleep(0.1)
    workers = _train_workers(started)
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=600)
    res = box.get("res")
    assert res is not None, "training did not finish after the worker was killed"
    assert res.steps == EPOCHS
    assert res.attempts >= 2, "the run did not resume from a checkpoint"
    assert len(res.losses) == EPOCHS


def test_deepspeed_zero2_on_cpu_trains_checkpoints_and_resumes(tiny_model_dir: Path, tmp_path: Path,
                                                                ray_local) -> None:
    """DeepSpeed's CPU accelerator on the gloo group Ray Train sets up: 2 workers, ZeRO stage 2, fp32."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (the deepspeed extra)")

    def run(epochs: int) -> object:
        return train_pem(model_dir=str(tiny_model_dir), rows=ROWS, out_dir=tmp_path / "ds-adapter", name="ds",
                         storage_uri=str(tmp_path / "ray-train"), lora=LoraConfig(r=4, alpha=8),
                         train=TrainConfig(strategy="deepspeed", zero_stage=2, num_workers=2, epochs=epochs,
                                           batch_size=4, lr=5e-3, max_length=64), seed=0)

    first = run(2)
    assert first.steps == 2 and len(first.losses) == 2 and first.losses[-1] < first.losses[0], first.losses
    assert (first.adapter_dir / "adapter_config.json").is_file()
    # The same run name and storage: the rerun resumes from the epoch-2 checkpoint and trains one more epoch.
    again = run(3)
    assert again.steps == 3 and again.losses[:2] == first.losses and again.attempts >= 1
    assert (tmp_path / "ds-adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.gpu
def test_deepspeed_strategy_on_gpu(tiny_model_dir: Path, tmp_path: Path, ray_local) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (gpu extra)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    res = train_pem(model_dir=str(tiny_model_dir), rows=ROWS, out_dir=tmp_path / "ds", name="ds",
                    storage_uri=str(tmp_path / "ray-train"), lora=LoraConfig(r=4, alpha=8),
                    train=TrainConfig(strategy="deepspeed", use_gpu=True, num_workers=1, epochs=2, batch_size=4))
    assert res.steps == 2 and res.losses[-1] < res.losses[0]


def _a_overlap(adapter: Path, previous: Path) -> float:
    """sum over shared modules of ||A_new A_prev^T||_F^2 (what O-LoRA's penalty drives down)."""
    from rr_ray.release.pem import read_lora

    new, prev = read_lora(adapter).modules, read_lora(previous).modules
    return sum(float((new[m][0] @ prev[m][0].T).pow(2).sum()) for m in set(new) & set(prev))


def test_orthogonality_penalty_moves_the_retain_pem_off_the_forget_subspace(tiny_model_dir: Path, tmp_path: Path,
                                                                           ray_local) -> None:
    import torch

    from rr_ray.release.train import build_trainable

    # The earlier PEM: the LoRA a worker builds with the same seed, untrained (only its A matters to the
    # penalty), so both retain PEMs start on its subspace. No Ray Train run needed for it.
    torch.manual_seed(0)
    forget = tmp_path / "forget-adapter"
    build_trainable(str(tiny_model_dir), None, LoraConfig(r=4, alpha=8), "float32").save_pretrained(forget)
    # One worker each: the penalty is per worker, and DDP is covered by test_train_two_ddp_workers.
    plain = _train(tmp_path, "retain-plain", epochs=3, workers=1, model_dir=str(tiny_model_dir))
    ortho = _train(tmp_path, "retain-ortho", epochs=3, workers=1, model_dir=str(tiny_model_dir),
                   orthogonal_to=[str(forget)], orthogonality=10.0)
    # Both retain PEMs start from the same seed, so the same initial A: only the penalty tells them apart.
    assert _a_overlap(ortho.adapter_dir, forget) < 0.5 * _a_overlap(plain.adapter_dir, forget)
    assert ortho.losses[-1] < ortho.losses[0]  # it still learns its rows


def test_a_long_prompt_loses_its_start_not_the_response(tiny_model_dir: Path) -> None:
    from rr_ray.models.loader import apply_chat, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir), padding_side="right")
    rows = [{"prompt": "first " + "word " * 200 + "last", "response": "yes indeed"},
            {"prompt": "short", "response": "long " * 200}]
    long_prompt, long_response = tokenize_rows(tok, rows, max_length=128)
    answer = tok("yes indeed", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(long_prompt["input_ids"]) == 128 and long_prompt["input_ids"][-len(answer):] == answer
    assert [t for t in long_prompt["labels"] if t != -100] == answer  # the whole response is learned
    prompt_tail = tok.decode(long_prompt["input_ids"][:-len(answer)])
    assert "last" in prompt_tail and "first" not in prompt_tail
    short = tok(apply_chat(tok, "short"), add_special_tokens=False)["input_ids"]
    assert len(long_response["input_ids"]) == 128 and long_response["input_ids"][:len(short)] == short
    assert all(t == -100 for t in long_response["labels"][:len(short)])
    assert all(t != -100 for t in long_response["labels"][len(short):])
