"""Where the edit lives: the size of the composed LoRA's update per layer and module, and how much of it lies in
the subspace of each forget PEM (section 4.1's similarity, ``release/subspace.py``).

||s B A||_F is computed from the r x r Gram matrices (trace(B^T B A A^T)), never from the dense update.
Relative sizes divide by the base weight's Frobenius norm, read from the model's safetensors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rr_ray.release.pem import read_lora
from rr_ray.release.subspace import adapter_similarity

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _base_norms(model_dir: str | Path, names: list[str]) -> dict[str, float]:
    from safetensors import safe_open

    wanted, out = {f"{n}.weight": n for n in names}, {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in set(f.keys()) & set(wanted):
                out[wanted[key]] = float(f.get_tensor(key).float().norm())
    return out


def edit_norms(adapter_dir: str | Path, model_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per adapted module: layer, module kind, ||dW||_F and (with ``model_dir``) ||dW||_F / ||W||_F."""
    import torch

    modules = read_lora(adapter_dir).modules
    base = _base_norms(model_dir, list(modules)) if model_dir else {}
    rows = []
    for name, (a, b, s) in modules.items():
        a64, b64 = a.double(), b.double()
        norm = abs(s) * float(torch.sqrt(torch.clamp(torch.trace((b64.T @ b64) @ (a64 @ a64.T)), min=0.0)))
        layer = _LAYER.search(f".{name}.")
        row = {"module": name, "layer": int(layer.group(1)) if layer else -1, "kind": name.rsplit(".", 1)[-1],
               "norm": norm}
        if name in base and base[name] > 0:
            row["relative"] = norm / base[name]
        rows.append(row)
    return sorted(rows, key=lambda r: (r["layer"], r["kind"]))


def per_layer(rows: list[dict[str, Any]], key: str = "norm") -> dict[str, list[tuple[int, float]]]:
    """module kind -> [(layer, value)] in layer order (for the plot and the table)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if key in r:
            out.setdefault(r["kind"], []).append((r["layer"], r[key]))
    return out


def forget_similarity(final_adapter: str | Path, forget_adapters: dict[str, str | Path],
                      k: int = 8) -> dict[str, dict[str, float]]:
    """Per forget PEM (step name -> adapter dir): mean and std over modules of Sim(final edit, that PEM), in the
    paper's form and normalised to [0, 1] (||U1^T U2||_F^2 / k)."""
    out = {}
    for step, adapter in forget_adapters.items():
        report = adapter_similarity(final_adapter, adapter, k)
        (mean, std), (nmean, nstd) = report.stats(), report.stats(normalised=True)
        out[step] = {"sim_mean": mean, "sim_std": std, "normalised_mean": nmean, "normalised_std": nstd,
                     "modules": len(report.modules)}
    return out
