"""Resolve a model reference (packaged name, local dir, s3:// URI, hub id) to a local HF directory and load it."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rr_ray.models.packaged import PACKAGED, ModelNotFoundError, ensure_packaged

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root(cache_dir: str | None = None) -> Path:
    """The rr-ray cache: explicit dir, else $RR_RAY_CACHE, else ~/.cache/rr-ray."""
    root = cache_dir or os.environ.get("RR_RAY_CACHE") or Path.home() / ".cache" / "rr-ray"
    return Path(root).expanduser()


def _from_s3(uri: str, root: Path, endpoint_url: str | None) -> Path:
    from rr_ray.storage import localize

    try:
        return localize(uri, endpoint_url=endpoint_url, cache=root, required="config.json")
    except FileNotFoundError:
        raise ModelNotFoundError(f"{uri}: no config.json under this prefix (not an HF model directory)") from None


def _from_hub(hub_id: str, root: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, cache_dir=str(root / "hub")))
    except Exception as exc:  # offline, unknown repo, auth: all reach the user as one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"hub id {hub_id!r} could not be fetched ({type(exc).__name__}: {first}); "
            "this machine may be offline: pass a local directory or an s3:// URI instead"
        ) from None


def resolve_model(
    name_or_path: str, cache_dir: str | None = None, s3_endpoint_url: str | None = None
) -> Path:
    """Return a local HF-format directory for any supported model reference."""
    root = cache_root(cache_dir)
    if name_or_path in PACKAGED:
        return ensure_packaged(name_or_path, root)
    if name_or_path.startswith("s3://"):
        return _from_s3(name_or_path, root, s3_endpoint_url)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{local}: no config.json (not an HF model directory)")
        return local
    return _from_hub(name_or_path, root)


def load_tokenizer(model_dir: str | Path, padding_side: str = "left") -> Any:
    """Tokenizer with a pad token and left padding (what batched decoding needs)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.cache
def resolve_dtype(dtype: str) -> str:
    """``auto`` -> bfloat16 on CUDA; on CPU the faster of bfloat16 and float32 for a small matmul here.

    CPUs differ by two orders of magnitude in bf16 speed (AMX vs AVX2-only), so measure rather than guess.
    """
    if dtype != "auto":
        return dtype
    if torch.cuda.is_available():
        return "bfloat16"
    speed = {}
    for name in ("float32", "bfloat16"):
        a = torch.randn(256, 256, dtype=DTYPES[name])
        a @ a
        t = time.perf_counter()
        for _ in range(3):
            a @ a
        speed[name] = time.perf_counter() - t
    return min(speed, key=speed.__getitem__)


def choose_device(assigned_gpus: Sequence[str] | None, cuda_available: bool,
                  visible: Sequence[str] | None = None) -> str:
    """The torch device for a model loaded in this process (pure: the inputs say everything).

    ``assigned_gpus``: the GPU ids Ray assigned to this worker, or None when the process is no Ray worker (a
    driver or a plain script, which owns the machine: CUDA if there is one). A Ray worker without GPUs gets the
    CPU even on a GPU node: Ray leaves CUDA_VISIBLE_DEVICES alone for num_gpus=0 work, and taking a GPU it
    did not reserve would crowd the workers it did. ``visible``: CUDA_VISIBLE_DEVICES as a list. Ray
    normally sets it to exactly the assigned ids (the GPU is then cuda:0); where it lists more (Ray's NOSET
    option, GPUs shared among a node's workers) the assigned id is found at its position in that list.
    Several assigned GPUs: the model goes to the first (one device per model; no sharding here).
    """
    if assigned_gpus is None:
        return "cuda" if cuda_available else "cpu"
    if not assigned_gpus or not cuda_available:
        return "cpu"
    order = list(visible or ())
    positions = [order.index(g) for g in assigned_gpus if g in order]
    return f"cuda:{min(positions)}" if positions else "cuda:0"


def ray_assigned_gpus() -> list[str] | None:
    """GPU ids Ray assigned to this process (``get_accelerator_ids``), or None outside a Ray worker."""
    ray = sys.modules.get("ray")  # never imported: certainly not a Ray worker, and no import cost
    if ray is None or not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    # A driver (also a Ray Client one, whose context has no local worker) has no assignment: "outside Ray".
    if getattr(getattr(ctx, "worker", None), "mode", None) != ray.WORKER_MODE:
        return None
    return [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]


def model_device() -> str:
    """Where a model loaded now in this process belongs: ``choose_device`` on Ray's assignment."""
    assigned = ray_assigned_gpus()
    visible = None
    if assigned:
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        # Unset: nothing masks the node's GPUs, so device i is physical GPU i (Ray's ids are those indices).
        ids = env.split(",") if env is not None else range(torch.cuda.device_count())
        visible = [str(v).strip() for v in ids]
    return choose_device(assigned, torch.cuda.is_available(), visible)


def load_model(model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> Any:
    """Causal LM in eval mode with the requested dtype (``auto`` allowed) on ``device``.

    The default stays CPU: Ray Train workers (release/train.py) get their device from Ray Train, and a
    caller that wants the accelerator Ray assigned passes ``model_device()``.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if device != "cpu":  # weights go straight to the accelerator instead of through a full host copy
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[resolve_dtype(dtype)], **kwargs)
    model.eval()
    return model


def apply_chat(tokenizer: Any, prompt: str | list[dict[str, str]], system: str | None = None) -> str:
    """Render a user prompt (or a full message list) with the tokenizer's own chat template."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n".join(m["content"] for m in messages) + "\n"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def describe_model(model_dir: str | Path) -> dict[str, Any]:
    """Architecture and parameter count read from config.json and safetensors headers (no weights loaded)."""
    import json

    from safetensors import safe_open

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    params = 0
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as fh:
            for key in fh.keys():
                shape = fh.get_slice(key).get_shape()
                n = 1
                for dim in shape:
                    n *= dim
                params += n
    return {"architecture": (config.get("architectures") or ["?"])[0], "parameters": params,
            "layers": config.get("num_hidden_layers"), "hidden": config.get("hidden_size")}
