"""Where two LoRA edits live: the subspace similarity of paper section 4.1 (Table 1).

Per target module, the update of a LoRA is s * B @ A (B: out x r, A: r x in). Section 4.1 takes the top-k left
singular vectors U^(k) of each update and scores two updates by Sim = ||U_1^(k)T U_2^(k)||_F / k. Its maximum is
1 / sqrt(k) (identical subspaces: the Frobenius norm of I_k is sqrt(k)), so ``normalised`` reports
||U_1^(k)T U_2^(k)||_F^2 / k as well, which runs from 0 (orthogonal) to 1 (the same subspace).

The update is never formed: with B = Q_B R_B and A^T = Q_A R_A (thin QR), B @ A = Q_B (R_B R_A^T) Q_A^T, so the
left singular vectors are Q_B times those of the r x r core. Cost O((out + in) r^2) instead of O(out * in * r).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rr_ray.release.pem import _A, _B, _PREFIX, ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_lora


def top_left_singular(b: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """(out, k') top-k left singular vectors of ``b @ a`` without forming it; k' = min(k, rank of the update)."""
    b, a = b.double(), a.double()
    q_b, r_b = torch.linalg.qr(b)  # out x r, r x r
    _, r_a = torch.linalg.qr(a.T)  # in x r (its columns only rotate the right singular vectors), r x r
    u, s, _ = torch.linalg.svd(r_b @ r_a.T)
    # Directions with (numerically) zero singular value are not part of the update's column space.
    keep = int((s > s.max().clamp_min(1e-300) * 1e-10).sum()) if s.numel() else 0
    return q_b @ u[:, : min(k, keep)]


def similarity(u1: torch.Tensor, u2: torch.Tensor) -> tuple[float, float]:
    """(paper Sim, normalised) of two orthonormal bases: ||U1^T U2||_F / k and ||U1^T U2||_F^2 / k.

    k is the smaller basis size (the paper's bases have the same k; a rank-deficient update gives fewer).
    """
    k = min(u1.shape[1], u2.shape[1])
    if k == 0:
        return 0.0, 0.0
    fro = float(torch.linalg.matrix_norm(u1.T @ u2))
    return fro / k, fro * fro / k


@dataclass(frozen=True)
class SubspaceReport:
    k: int
    modules: dict[str, tuple[float, float]]  # module name -> (paper Sim, normalised)

    def stats(self, normalised: bool = False) -> tuple[float, float]:
        """Mean and standard deviation over modules (Table 1's two columns)."""
        vals = np.array([v[1 if normalised else 0] for v in self.modules.values()])
        return (float(vals.mean()), float(vals.std())) if vals.size else (float("nan"), float("nan"))


def adapter_similarity(first: str | Path, second: str | Path, k: int = 8) -> SubspaceReport:
    """Section 4.1 between two saved LoRAs, over the target modules both adapters have."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    one, two = read_lora(first).modules, read_lora(second).modules
    shared = sorted(set(one) & set(two))
    if not shared:
        raise ValueError(f"{first} and {second} share no target module")
    out = {}
    for name in shared:
        (a1, b1, _), (a2, b2, _) = one[name], two[name]
        out[name] = similarity(top_left_singular(b1, a1, k), top_left_singular(b2, a2, k))
    return SubspaceReport(k, out)


def deficiency_lora(anti_expert: str | Path, expert: str | Path, out_dir: str | Path) -> Path:
    """Ext-Sub's deficiency part of ``anti_expert`` (Hu et al. 2024), as a LoRA of the same rank.

    Per module, the anti-expert's update s B A is split into what lies in the column space of the expert's
    update (the capability both share) and the rest: B' = (I - U U^T) B with U the expert update's left
    singular vectors (all of them, from the QR + core SVD above), A unchanged. Rows of B index the module's
    outputs, so this works for any out x in projection (GQA's k/v, MLP up/down), square or not. Modules the
    expert does not touch keep the anti-expert's update whole.
    """
    from safetensors.torch import save_file

    anti, exp = read_lora(anti_expert), read_lora(expert).modules
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b, _) in anti.modules.items():
        if name in exp:
            a_e, b_e, _ = exp[name]
            u = top_left_singular(b_e, a_e, b_e.shape[1]).float()
            b = b - u @ (u.T @ b)
        tensors[_PREFIX + name + _A], tensors[_PREFIX + name + _B] = a.contiguous(), b.contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copy(Path(anti_expert) / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    (out / "ext_sub.json").write_text(json.dumps({"anti_expert": str(anti_expert), "expert": str(expert)}))
    return out
