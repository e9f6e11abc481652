"""PEM algebra for equation 1 (paper section 3.2): the edit log and its exact composition into one LoRA.

A model in the Release stage is ``Phi_0 + sum_i c_i * DeltaPhi_i`` (c = -mu for forget PEMs, +lambda for retain
PEMs). Each DeltaPhi_i is a LoRA, so per target module the sum is

    sum_i c_i s_i B_i A_i = [c_1 s_1 B_1 | ... | c_L s_L B_L] @ [A_1; ...; A_L]

i.e. ONE LoRA of rank sum r_i with scaling 1 (DESIGN.md, "Exact composition"). Evaluation and serving load that
stacked adapter on the untouched base model; only export merges weights (``merge_into``).

Why not peft's ``add_weighted_adapter(combination_type="cat")``: its arithmetic is right for negative weights
(it puts ``weight * scaling`` on A, linearly, sign kept), but before peft 0.22 the new adapter's config is
``replace(config_of_first_adapter, r=R, lora_alpha=R)``, so it inherits ``use_rslora`` from the first adapter:
its scaling becomes R / sqrt(R) = sqrt(R) instead of 1 and the composed delta is sqrt(R) times too large
(measured: tests/test_pem.py::test_peft_cat_inherits_rslora; peft 0.22 sets use_rslora=False). It also
inherits ``layers_to_transform`` from the first adapter, so it raises "No matching LoRAs found" when the union
of targets holds a module that no adapter touches; and it needs the base model loaded with every adapter and
computes in the model's dtype.
So we stack the tensors ourselves, from the saved files, in float32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # how peft's save_pretrained names the wrapped model's modules
_A, _B = ".lora_A.weight", ".lora_B.weight"
# Config switches that change what a LoRA computes beyond s * B @ A on a Linear: refused, not ignored.
_UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers", "lora_bias": "lora_bias",
                "use_qalora": "QALoRA", "alora_invocation_tokens": "aLoRA", "modules_to_save": "modules_to_save",
                "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
                "target_parameters": "target_parameters"}


@dataclass(frozen=True)
class Edit:
    """One term c_i * DeltaPhi_i of equation 1."""

    adapter: str  # PEFT LoRA dir; a relative path is resolved against the ``root`` given to compose/merge_into
    coef: float  # signed: -mu for a forget PEM, +lambda for a retain PEM
    kind: str  # "forget" | "retain" | other label
    step: str = ""  # e.g. "mu_0", "lambda_1"


@dataclass(frozen=True)
class EditLog:
    """The current model: the base model's identity plus the ordered edits applied to it."""

    base: str  # base model identity (name_or_path)
    edits: tuple[Edit, ...] = ()

    def then(self, edit: Edit) -> EditLog:
        return EditLog(self.base, (*self.edits, edit))

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "edits": [
            {"adapter": e.adapter, "coef": e.coef, "kind": e.kind, "step": e.step} for e in self.edits]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EditLog:
        if not isinstance(d, dict) or "base" not in d:
            raise ValueError("edit log JSON must be an object with 'base' and 'edits'")
        try:
            edits = tuple(Edit(str(e["adapter"]), float(e["coef"]), str(e["kind"]), str(e.get("step", "")))
                          for e in d.get("edits", []))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad edit in edit log JSON ({type(exc).__name__}: {exc}); "
                             "each edit needs adapter, coef (number), kind") from None
        return cls(str(d["base"]), edits)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        os.replace(tmp, path)  # a reader never sees half a log

    @classmethod
    def load(cls, path: str | Path) -> EditLog:
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class _Lora:
    """One saved LoRA: per module (A [r, in], B [out, r], scaling s), all float32."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    rank: int  # the largest rank over its modules (rank_pattern can make them differ)
    config: dict[str, Any]


def _resolve(adapter: str, root: str | Path | None) -> Path:
    path = Path(adapter).expanduser()
    return Path(root) / path if root is not None and not path.is_absolute() else path


def read_lora(adapter_dir: str | Path) -> _Lora:
    """Read a peft-saved LoRA dir; refuse anything that is not plain LoRA on Linear layers."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter dir (needs {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type {config.get('peft_type')!r}; only LORA adapters compose")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{adapter_dir}: bias={config['bias']!r}; only bias='none' LoRAs compose")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"{adapter_dir}: {what} is not supported; only plain LoRA on nn.Linear composes")
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    names: set[str] = set()
    for key in tensors:
        if not key.startswith(_PREFIX) or not key.endswith((_A, _B)):
            raise ValueError(f"{adapter_dir}: unexpected tensor {key!r}; only lora_A/lora_B weights compose")
        names.add(key[len(_PREFIX): -len(_A)])
    alpha, alpha_pattern = config["lora_alpha"], config.get("alpha_pattern") or {}
    modules = {}
    for name in sorted(names):
        a, b = tensors.get(_PREFIX + name + _A), tensors.get(_PREFIX + name + _B)
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{adapter_dir}: module {name} lacks a matching 2-d lora_A/lora_B pair")
        r = a.shape[0]
        mod_alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), alpha)  # as peft resolves it
        s = mod_alpha / math.sqrt(r) if config.get("use_rslora") else mod_alpha / r
        modules[name] = (a.float(), b.float(), s)
    if not modules:
        raise ValueError(f"{adapter_dir}: adapter has no LoRA weights")
    return _Lora(modules, max(a.shape[0] for a, _, _ in modules.values()), config)


def _stack(log: EditLog, root: str | Path | None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, dict]:
    """Per module the stacked (A [R, in], B [out, R]) with c_i s_i folded into B_i; R = sum of edit ranks.

    An edit that does not touch a module contributes a zero block there, so every module has the same rank R
    and the result is a plain uniform-rank LoRA (no rank_pattern, which not every LoRA loader honours).
    """
    loras = [read_lora(_resolve(e.adapter, root)) for e in log.edits]
    total = sum(lora.rank for lora in loras)
    names = sorted(set().union(*(lora.modules for lora in loras)))
    out = {}
    for name in names:
        shapes = {(b.shape[0], a.shape[1]) for lora in loras if name in lora.modules
                  for a, b, _ in [lora.modules[name]]}
        if len(shapes) != 1:
            raise ValueError(f"module {name}: adapters disagree on its shape {sorted(shapes)}; different base models?")
        (d_out, d_in), = shapes
        a_stack, b_stack, offset = torch.zeros(total, d_in), torch.zeros(d_out, total), 0
        for edit, lora in zip(log.edits, loras):
            if name in lora.modules:
                a, b, s = lora.modules[name]
                a_stack[offset: offset + a.shape[0]] = a
                b_stack[:, offset: offset + a.shape[0]] = (edit.coef * s) * b
            offset += lora.rank
        out[name] = (a_stack, b_stack)
    return out, total, loras[0].config


def compose(log: EditLog, out_dir: str | Path, root: str | Path | None = None) -> Path | None:
    """Write the whole edit log as ONE PEFT LoRA dir of summed rank (scaling 1); None for an empty log."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not log.edits:
        return None
    stacked, total, first = _stack(log, root)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in stacked.items():
        tensors[_PREFIX + name + _A] = a.contiguous()
        tensors[_PREFIX + name + _B] = b.contiguous()
    # lora_alpha = r and use_rslora False make the scaling exactly 1; full module paths as targets so a module
    # is wrapped iff some edit touched it (short names would also wrap layers excluded by layers_to_transform).
    config = LoraConfig(r=total, lora_alpha=total, use_rslora=False, target_modules=sorted(stacked),
                        lora_dropout=0.0, bias="none", task_type=first.get("task_type"),
                        base_model_name_or_path=log.base, inference_mode=True)
    tmp = out_dir / f".{ADAPTER_WEIGHTS}.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / ADAPTER_WEIGHTS)
    config.save_pretrained(str(out_dir))
    log.save(out_dir / "edit_log.json")  # provenance: which edits this adapter is
    return out_dir


def scaled(adapter_dir: str | Path, coef: float, out_dir: str | Path) -> Path:
    """``coef * adapter`` as its own LoRA dir (a one-edit composition)."""
    base = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    out = compose(EditLog(base, (Edit(str(adapter_dir), coef, "scaled"),)), out_dir)
    assert out is not None
    return out


def delta_weights(log: EditLog, root: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Per module path the dense float32 delta sum_i c_i s_i B_i A_i (shape of the module's weight)."""
    if not log.edits:
        return {}
    stacked, _, _ = _stack(log, root)
    return {name: b @ a for name, (a, b) in stacked.items()}


def _target_weight(model: Any, name: str, delta: torch.Tensor) -> torch.nn.Parameter:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"model has no module {name!r}: merge_into needs the plain transformers model the "
                         "adapters were trained on (not a PeftModel)") from None
    if not isinstance(module, torch.nn.Linear) or module.weight.shape != delta.shape:
        raise ValueError(f"{name}: expected nn.Linear with weight {tuple(delta.shape)}, got {module}")
    return module.weight


def merge_into(model: Any, log: EditLog, root: str | Path | None = None) -> Any:
    """Add sum_i c_i s_i B_i A_i into the weights in place (for export); returns the model."""
    return _add(model, delta_weights(log, root))


@torch.no_grad()
def _add(model: Any, deltas: dict[str, torch.Tensor]) -> Any:
    for name, delta in deltas.items():
        weight = _target_weight(model, name, delta)
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))  # add in fp32, store as is
    return model


@contextlib.contextmanager
def merged(model: Any, log: EditLog, root: str | Path | None = None) -> Iterator[Any]:
    """``with merged(model, log):`` the model carries the edits; the original weights come back bit-exact after."""
    deltas = delta_weights(log, root)
    saved = {name: _target_weight(model, name, delta).detach().clone() for name, delta in deltas.items()}
    try:
        yield _add(model, deltas)
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                model.get_submodule(name).weight.copy_(weight)


def load_composed(model_dir: str | Path, adapter_dir: str | Path | None, dtype: str = "float32") -> Any:
    """Base model plus (optionally) a composed adapter through peft, in eval mode."""
    from rr_ray.models.loader import load_model

    model = load_model(model_dir, dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model
