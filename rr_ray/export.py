"""``rr-ray export RUN``: a finished Release run as files any Hugging Face stack loads without rr-ray.

export/ holds three equivalent forms of the unlearned model of equation 1 (paper section 3.2),
``Phi = Phi_0 + sum_i c_i dPhi_i``:

- ``merged/``: the weights with every edit added in (``pem.merge_into``: each delta sum_i c_i s_i B_i A_i is
  formed in float32 from the saved tensors and added once, so it is exact up to the checkpoint's dtype;
  peft's ``merge_and_unload`` would form B @ A in the model's dtype);
- ``composed_lora/``: the edit log as ONE PEFT LoRA of summed rank and scaling 1 (``pem.compose``);
- ``adapters/<step>/`` + ``edit_log.json``: each PEM as trained, with its signed coefficient.

Everything is built in a local temp dir and uploaded with ``RunDir.upload_dir``, so local and s3:// runs take
one path; the done marker is written last.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rr_ray.config import RRConfig
from rr_ray.release.loop import EDIT_LOG, local_log
from rr_ray.release.pem import Edit, EditLog, compose, merge_into
from rr_ray.storage import RunDir

STAGE = "export"
logger = logging.getLogger(__name__)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def _uri(run: RunDir, rel: str) -> str:
    return f"{run.uri.rstrip('/')}/{rel}"


def _copy_adapters(log: EditLog, out: Path) -> EditLog:
    """Copy each (local) PEM dir to out/adapters/<step>; returns the log with export-relative paths."""
    edits = []
    for i, e in enumerate(log.edits):
        name = e.step or f"edit_{i}"
        shutil.copytree(e.adapter, out / "adapters" / name, ignore=shutil.ignore_patterns(".*"))
        edits.append(Edit(f"adapters/{name}", e.coef, e.kind, e.step))
    return EditLog(log.base, tuple(edits))


def _rank(adapter_dir: Path | None) -> int | None:
    return json.loads((adapter_dir / "adapter_config.json").read_text())["r"] if adapter_dir else None


def _merged(model_dir: Path, log: EditLog, root: Path, out: Path) -> str:
    """Base + every edit merged into the weights, saved in the base checkpoint's dtype; returns that dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rr_ray.models.loader import model_device, ray_assigned_gpus

    # A GPU only where Ray assigned one to this process. Export normally runs in the driver (on a cluster the
    # head, which has no GPU): there the full weights are merged in host memory, since a merge is one add per
    # weight (no compute worth a GPU) and a GPU Ray did not reserve may be busy or too small for the model.
    device = model_device() if ray_assigned_gpus() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto",
                                                 **({"device_map": device} if device != "cpu" else {}))
    merge_into(model, log, root)
    model.save_pretrained(str(out))  # safetensors, config.json, generation_config.json
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))  # incl. the chat template
    return str(model.dtype).removeprefix("torch.")


def _vllm_hint(rank: int | None, base: str = "BASE") -> str:
    fit = next((r for r in VLLM_LORA_RANKS if rank and r >= rank), None)
    if fit is None:
        return ("The base model plus a LoRA does not apply here" if not rank else
                f"Rank {rank} is above vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]})") + ": serve `merged/`."
    return (f"Or the base model with the composed LoRA: `vllm serve {base} --enable-lora --max-lora-rank {fit} "
            "--lora-modules unlearned=export/composed_lora`, then request model `unlearned`.")


def _readme(log: EditLog, rank: int | None, dtype: str) -> str:
    rows = "\n".join(f"| `adapters/{Path(e.adapter).name}` | {e.kind} | {e.coef:+g} |" for e in log.edits)
    lora = (f"one PEFT LoRA of rank {rank} (the edits' ranks summed, scaling 1) equal to the whole edit log."
            if rank else "absent: the edit log is empty.")
    return f"""# rr-ray export

The unlearned model of a Reveal-and-Release run: `Phi = Phi_0 + sum_i c_i dPhi_i` (paper eq. 1), base model
`{log.base}`. The three forms below compute the same model.

- `merged/`: full model in Hugging Face format ({dtype} safetensors, config, tokenizer); the edits were summed
  in float32 and added to the weights once.
- `composed_lora/`: {lora}
- `adapters/<step>/`: each parameter-efficient module (PEFT LoRA) as trained; `edit_log.json` lists them in
  order with their signed coefficients c_i (negative: forget, positive: retain).

| adapter | kind | coefficient c_i |
|---|---|---:|
{rows}

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("export/merged")
tokenizer = AutoTokenizer.from_pretrained("export/merged")

from peft import PeftModel  # or: the base model plus the composed LoRA
base = AutoModelForCausalLM.from_pretrained("{log.base}")
model = PeftModel.from_pretrained(base, "export/composed_lora")
```

The adapter stack with peft: load each `adapters/<step>` with `load_adapter(path, adapter_name=step)`, activate
all with `model.base_model.set_adapter([...])`, and on every LoRA layer call `set_scale(step, c_i)`.

vLLM: `vllm serve export/merged` (or `LLM(model="export/merged")`). {_vllm_hint(rank, log.base)}
"""


def exported(run: RunDir) -> dict[str, Any] | None:
    """The export marker's info, or None if export is not done or its files are gone: export/ stays out of git
    (the merged model is GBs), so a clone of a finished run has the marker without the files."""
    info = run.done_info(STAGE)
    if info is None:
        return None
    files = [rel for rel in run.manifest() if rel.startswith(f"{STAGE}/")]
    missing = [rel for rel in files if not run.exists(rel)]
    if missing or not files:
        logger.warning("%s: export is marked done but %d of its %d files are missing: exporting again", run.uri,
                       len(missing), len(files))
        return None
    return info


def export_run(run: RunDir, cfg: RRConfig) -> dict[str, Any]:
    """Write export/ (merged model, adapters, composed LoRA, edit log, README); skipped when already done."""
    done = exported(run)
    return done if done is not None else write_export(run, cfg)


def write_export(run: RunDir, cfg: RRConfig) -> dict[str, Any]:
    """Build export/ from the run's edit log and mark the stage done (callers check :func:`exported` first)."""
    from rr_ray.models.loader import resolve_model

    if not run.exists(EDIT_LOG):
        raise FileNotFoundError(f"{run.uri}: no {EDIT_LOG}; run `rr-ray release` first")
    t0 = time.perf_counter()
    log = local_log(EditLog.from_json(run.read_json(EDIT_LOG)), run, cfg.run.s3_endpoint_url)
    model_dir = resolve_model(cfg.model.name_or_path, cfg.model.cache_dir, cfg.run.s3_endpoint_url)
    with tempfile.TemporaryDirectory(prefix="rr-ray-export-") as tmp:
        out = Path(tmp)
        rel_log = _copy_adapters(log, out)
        rel_log.save(out / "edit_log.json")
        # Composed from the exported copies, so composed_lora/edit_log.json (its provenance) names files that
        # ship in export/ (paths relative to export/), not run-directory or cache paths.
        composed = compose(rel_log, out / "composed_lora", root=out)
        rank = _rank(composed)
        dtype = _merged(model_dir, rel_log, out, out / "merged")
        (out / "README.md").write_text(_readme(rel_log, rank, dtype))
        files = run.upload_dir(out, STAGE)
    info = {"export": _uri(run, STAGE), "merged": _uri(run, f"{STAGE}/merged"),
            "composed_lora": _uri(run, f"{STAGE}/composed_lora") if composed else None, "composed_rank": rank,
            "adapters": [e.adapter for e in rel_log.edits], "base": log.base, "dtype": dtype, "files": len(files),
            "bytes": sum(run.manifest()[f]["bytes"] for f in files), "seconds": round(time.perf_counter() - t0, 1)}
    run.mark_done(STAGE, info)
    return info
