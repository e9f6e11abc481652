"""Section 4.1's subspace similarity: the QR + small-SVD path against a direct SVD of the dense update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rr_ray.release.subspace import adapter_similarity, similarity, top_left_singular


def _direct(b: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(b.double() @ a.double())
    return u[:, :k]


def _projector(u: torch.Tensor) -> torch.Tensor:
    return u @ u.T  # the subspace itself: singular vectors are only defined up to sign (and rotation in ties)


@pytest.mark.parametrize(("out_dim", "in_dim", "r", "k"), [(24, 40, 6, 4), (40, 24, 6, 6), (16, 16, 8, 3),
                                                           (128, 32, 8, 8)])
def test_top_left_singular_matches_a_direct_svd(out_dim: int, in_dim: int, r: int, k: int) -> None:
    gen = torch.Generator().manual_seed(out_dim * 7 + in_dim)
    b, a = torch.randn(out_dim, r, generator=gen), torch.randn(r, in_dim, generator=gen)  # non-square as in GQA
    fast = top_left_singular(b, a, k)
    assert fast.shape == (out_dim, k)
    torch.testing.assert_close(fast.T @ fast, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(_projector(fast), _projector(_direct(b, a, k)), atol=1e-8, rtol=0)


def test_rank_deficient_update_gives_only_its_own_directions() -> None:
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(20, 4, generator=gen)
    b[:, 3] = b[:, 0] * 2.0  # rank 3 update from an r = 4 LoRA
    u = top_left_singular(b, torch.randn(4, 30, generator=gen), 8)
    assert u.shape == (20, 3)


def test_similarity_bounds_and_the_papers_scale() -> None:
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(64, 16, generator=gen, dtype=torch.float64))
    same, other = q[:, :8], q[:, 8:]
    paper, norm = similarity(same, same)
    assert paper == pytest.approx(8 ** -0.5) and norm == pytest.approx(1.0)  # the paper's Sim tops at 1/sqrt(k)
    assert similarity(same, other) == pytest.approx((0.0, 0.0), abs=1e-12)
    half = torch.cat([q[:, :4], q[:, 8:12]], dim=1)  # shares 4 of 8 directions
    assert similarity(same, half)[1] == pytest.approx(0.5)


def test_adapter_similarity_of_saved_loras(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
        model.save_pretrained(tmp_path / f"a{seed}")
        dirs.append(tmp_path / f"a{seed}")
    self_rep = adapter_similarity(dirs[0], dirs[0], k=4)
    cross = adapter_similarity(dirs[0], dirs[1], k=4)
    assert set(self_rep.modules) == set(cross.modules) and len(cross.modules) >= 4
    assert self_rep.stats(normalised=True)[0] == pytest.approx(1.0)
    mean, std = cross.stats(normalised=True)
    assert 0.0 < mean < 0.9 and std >= 0.0  # independent random LoRAs: far from the same subspace
    with pytest.raises(ValueError, match="k must be"):
        adapter_similarity(dirs[0], dirs[1], k=0)


def test_ext_sub_deficiency_is_orthogonal_to_the_expert_and_keeps_the_rest(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rr_ray.release.pem import read_lora
    from rr_ray.release.subspace import deficiency_lora

    def lora(seed: int, targets: list[str], r: int) -> Path:
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
        model.save_pretrained(tmp_path / f"l{seed}")
        return tmp_path / f"l{seed}"

    # v_proj is 32 -> 16 here (2 key/value heads of 8 for 4 query heads): a non-square projection
    anti, expert = lora(1, ["q_proj", "v_proj", "down_proj"], 4), lora(2, ["q_proj", "v_proj"], 3)
    out = read_lora(deficiency_lora(anti, expert, tmp_path / "deficiency")).modules
    before, exp = read_lora(anti).modules, read_lora(expert).modules
    assert set(out) == set(before)
    shapes = set()
    for name, (a, b, s) in out.items():
        a0, b0, s0 = before[name]
        assert s == s0 and torch.equal(a, a0)
        shapes.add(tuple(b.shape))
        if name in exp:
            u = top_left_singular(exp[name][1], exp[name][0], 3).float()
            assert float((u.T @ (b @ a)).abs().max()) < 1e-4  # nothing left in the expert's subspace
            torch.testing.assert_close(b + u @ (u.T @ b0), b0, atol=1e-5, rtol=0)  # deficiency + shared = whole
        else:
            torch.testing.assert_close(b, b0)  # a module the expert does not touch is kept whole
    assert any(o != 32 for o, _ in shapes)  # a non-square (out != hidden) module was split too
