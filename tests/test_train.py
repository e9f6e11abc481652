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


def _train(tmp: Path, name: str, epochs: int, **kw) -> object:
    return train_pem(model_dir=kw.pop("model_dir"), rows=ROWS, out_dir=tmp / f"{name}-adapter", name=name,
                     storage_uri=str(tmp / "ray-train"), lora=LoraConfig(r=4, alpha=8),
                     train=TrainConfig(num_workers=2, epochs=epochs, batch_size=4, lr=5e-3, max_length=64),
                     seed=0, **kw)


def test_tokenize_masks_the_prompt(tiny_model_dir: Path) -> None:
    from rr_ray.models.loader import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    (row,) = tokenize_rows(tok, ROWS[:1], 256)
    learned = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tok.decode(learned).startswith("The colour is blue 0.")
    assert learned[-1] == tok.eos_token_id
    assert row["labels"][0] == -100


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
