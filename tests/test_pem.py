"""Exact LoRA composition (equation 1, DESIGN "Exact composition") on the tiny random Llama.

The reference for every check is independent of rr_ray.release.pem: peft's own ``merge_and_unload`` gives each
adapter's dense delta (W_merged - W_base), and the expected model is W_base + sum_i c_i * delta_i.
Tolerance: fp32 logits, atol 1e-4 and rtol 1e-5 (logits here are O(10); the two paths round differently).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from rr_ray.release.pem import Edit, EditLog, compose, delta_weights, load_composed, merge_into, merged, scaled

ATOL, RTOL = 1e-4, 1e-5
IDS = torch.tensor([[1, 431, 2300, 88, 9020, 17, 5, 600, 44, 3000, 12, 7]])


def _make_lora(model_dir: Path, out: Path, seed: int, **cfg) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **cfg))  # random A and B != 0
    peft_model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def loras(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "qv": _make_lora(tiny_model_dir, root / "qv", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "kou": _make_lora(tiny_model_dir, root / "kou", 2, r=2, lora_alpha=16,
                          target_modules=["k_proj", "o_proj", "up_proj"]),
        "rs": _make_lora(tiny_model_dir, root / "rs", 3, r=6, lora_alpha=4, use_rslora=True,
                         target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                         rank_pattern={"down_proj": 3}, alpha_pattern={"down_proj": 9}),
    }


def _base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _peft_delta(model_dir: Path, adapter: str) -> dict[str, torch.Tensor]:
    """Dense delta of one adapter as peft itself merges it."""
    from peft import PeftModel

    base = _base(model_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    after = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    return {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}


def _reference(model_dir: Path, terms: list[tuple[str, float]]):
    model = _base(model_dir)
    state = model.state_dict()
    with torch.no_grad():
        for adapter, coef in terms:
            for key, delta in _peft_delta(model_dir, adapter).items():
                state[key].add_(coef * delta)
    return model


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


def _log(loras: dict[str, str], terms: list[tuple[str, float]]) -> EditLog:
    log = EditLog("tiny")
    for i, (name, coef) in enumerate(terms):
        log = log.then(Edit(loras[name], coef, "forget" if coef < 0 else "retain", f"step_{i}"))
    return log


@pytest.mark.parametrize("terms", [
    [("qv", -1.0)],  # negation
    [("qv", 2.5)],  # scaling
    [("qv", -0.7), ("kou", 0.4), ("rs", -1.3)],  # different ranks, alphas, targets, rsLoRA, patterns
], ids=["negate", "scale", "three"])
def test_composed_adapter_equals_merged_weights(tiny_model_dir: Path, loras, tmp_path: Path, terms) -> None:
    out = compose(_log(loras, terms), tmp_path / "composed")
    assert out is not None
    expected = _logits(_reference(tiny_model_dir, [(loras[n], c) for n, c in terms]))
    assert not torch.allclose(expected, _logits(_base(tiny_model_dir)), atol=1e-2)  # the edit is visible
    got = _logits(load_composed(tiny_model_dir, out, "float32"))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_composed_config_is_one_plain_lora(loras, tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file

    out = compose(_log(loras, [("qv", -1.0), ("kou", 1.0), ("rs", 1.0)]), tmp_path / "c")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 + 2 + 6 and cfg["use_rslora"] is False
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {12}
    # layers_to_transform=[1] kept: layer 0 has no down_proj (only layer 1 does)
    assert not any("layers.0.mlp.down_proj" in k for k in tensors)
    assert any("layers.1.mlp.down_proj" in k for k in tensors)
    assert EditLog.load(out / "edit_log.json").edits[0].coef == -1.0


def test_add_then_subtract_cancels(tiny_model_dir: Path, loras, tmp_path: Path) -> None:
    out = compose(_log(loras, [("kou", 1.0), ("kou", -1.0)]), tmp_path / "zero")
    torch.testing.assert_close(_logits(load_composed(tiny_model_dir, out, "float32")),
                               _logits(_base(tiny_model_dir)), atol=ATOL, rtol=RTOL)


def test_scaled_is_linear(tiny_model_dir: Path, loras, tmp_path: Path) -> None:
    out = scaled(loras["rs"], -3.0, tmp_path / "s")
    torch.testing.assert_close(_logits(load_composed(tiny_model_dir, out, "float32")),
                               _logits(_reference(tiny_model_dir, [(loras["rs"], -3.0)])), atol=ATOL, rtol=RTOL)


def test_merge_into_equals_composed(tiny_model_dir: Path, loras, tmp_path: Path) -> None:
    log = _log(loras, [("qv", -0.7), ("kou", 0.4), ("rs", -1.3)])
    composed = _logits(load_composed(tiny_model_dir, compose(log, tmp_path / "c"), "float32"))
    torch.testing.assert_close(_logits(merge_into(_base(tiny_model_dir), log)), composed, atol=ATOL, rtol=RTOL)


def test_merged_context_restores_weights_exactly(tiny_model_dir: Path, loras) -> None:
    model = _base(tiny_model_dir)
    before = copy.deepcopy(model.state_dict())
    plain = _logits(model)
    with merged(model, _log(loras, [("qv", -2.0), ("rs", 1.0)])) as edited:
        assert not torch.allclose(_logits(edited), plain, atol=1e-2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_relative_adapter_paths_resolve_against_root(tiny_model_dir: Path, loras, tmp_path: Path) -> None:
    root = Path(loras["qv"]).parent
    rel = EditLog("tiny", (Edit("qv", -1.0, "forget"),))
    absolute = _log(loras, [("qv", -1.0)])
    a, b = delta_weights(rel, root=root), delta_weights(absolute)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError):
        compose(rel, tmp_path / "x")  # without root the relative path is not found


def test_empty_log_composes_to_none(tmp_path: Path) -> None:
    assert compose(EditLog("tiny"), tmp_path / "none") is None
    assert not (tmp_path / "none").exists()


def test_edit_log_json_round_trip(tmp_path: Path) -> None:
    log = EditLog("HuggingFaceTB/SmolLM2-135M-Instruct").then(Edit("release/step_00/adapter", -2.0, "forget",
                                                                    "mu_0"))
    log = log.then(Edit("release/step_01/adapter", 0.5, "retain", "lambda_1"))
    assert EditLog.from_json(log.to_json()) == log
    log.save(tmp_path / "edit_log.json")
    assert EditLog.load(tmp_path / "edit_log.json") == log
    assert len(log.edits) == 2 and log.edits[0].step == "mu_0"
    with pytest.raises(ValueError, match="coef"):
        EditLog.from_json({"base": "b", "edits": [{"adapter": "x", "kind": "forget"}]})


@pytest.mark.parametrize("cfg,match", [
    (dict(use_dora=True), "DoRA"),
    (dict(bias="lora_only"), "bias"),
], ids=["dora", "bias"])
def test_unsupported_adapters_are_refused(tiny_model_dir: Path, tmp_path: Path, cfg, match) -> None:
    adapter = _make_lora(tiny_model_dir, tmp_path / "bad", 4, r=2, lora_alpha=4, target_modules=["q_proj"], **cfg)
    with pytest.raises(ValueError, match=match):
        compose(EditLog("tiny", (Edit(adapter, -1.0, "forget"),)), tmp_path / "out")


def test_peft_cat_inherits_rslora(tiny_model_dir: Path, loras, tmp_path: Path) -> None:
    """One reason pem.py stacks tensors itself: peft's "cat" is exact with negative weights for plain LoRAs, but
    before peft 0.22 the combined adapter copies use_rslora from the first adapter (scaling sqrt(R), not 1)."""
    import peft
    from packaging.version import Version
    from peft import PeftModel

    rs = _make_lora(tiny_model_dir, tmp_path / "rs", 5, r=6, lora_alpha=4, use_rslora=True,
                    target_modules=["q_proj", "v_proj"])
    paths = {"qv": loras["qv"], "rs": rs}

    def cat_delta(first: str, second: str) -> tuple[torch.Tensor, torch.Tensor]:
        model = PeftModel.from_pretrained(_base(tiny_model_dir), paths[first], adapter_name=first)
        model.load_adapter(paths[second], adapter_name=second)
        model.add_weighted_adapter([first, second], [-1.5, 0.5], "cat", combination_type="cat")
        q = model.base_model.model.model.layers[1].self_attn.q_proj
        return q.get_delta_weight("cat"), -1.5 * q.get_delta_weight(first) + 0.5 * q.get_delta_weight(second)

    got, want = cat_delta("qv", "rs")  # plain first adapter: exact, negative weight included
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    got, want = cat_delta("rs", "qv")  # rsLoRA first adapter: off by sqrt(R) before peft 0.22, exact since
    if Version(peft.__version__) < Version("0.22"):
        assert not torch.allclose(got, want, atol=1e-3)
    else:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    ours = delta_weights(_log(paths, [("rs", -1.5), ("qv", 0.5)]))["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-5)


def test_hf_generator_with_composed_adapter_matches_merged_model(tiny_model_dir: Path, loras,
                                                                   tmp_path: Path) -> None:
    from rr_ray.generation.base import Request, SamplingParams
    from rr_ray.generation.hf_generator import HFGenerator
    from rr_ray.models.loader import load_tokenizer

    log = _log(loras, [("qv", -0.7), ("kou", 0.4), ("rs", -1.3)])
    adapter = str(compose(log, tmp_path / "c"))
    merged_dir = tmp_path / "merged"
    merge_into(_base(tiny_model_dir), log).save_pretrained(merged_dir)
    load_tokenizer(tiny_model_dir).save_pretrained(merged_dir)
    prompts = ["Write a function.", "Hi", "Tell me about castles."]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    gen = HFGenerator(tiny_model_dir, dtype="float32", threads=1, batch_size=8)
    plain = [g[0].text for g in gen.generate([Request(p) for p in prompts], params)]
    edited = [g[0].text for g in gen.generate([Request(p, adapter=adapter) for p in prompts], params)]
    reference = [g[0].text for g in HFGenerator(merged_dir, dtype="float32", threads=1).generate(
        [Request(p) for p in prompts], params)]
    assert edited == reference
    assert edited != plain


def test_scorer_scores_rows_under_different_composed_adapters(tiny_model_dir: Path, loras, tmp_path: Path) -> None:
    """A sweep's candidates as composed adapters, one per row, in one Scorer.loglik pass."""
    from rr_ray.evaluation.scoring import Scorer

    scorer = Scorer.from_model_dir(tiny_model_dir, threads=1, batch_size=8)
    dirs = [str(compose(_log(loras, [("qv", -1.0), ("kou", c)]), tmp_path / f"c{k}")) for k, c in enumerate([0.5, 2])]
    prompts, conts = ["def f(x):", "Hello there"], [" return x + 1", " general Kenobi"]
    mixed = scorer.loglik(prompts * 2, conts * 2, adapter=[dirs[0]] * 2 + [dirs[1]] * 2, chat=False)
    one_by_one = scorer.loglik(prompts, conts, dirs[0], chat=False) + scorer.loglik(prompts, conts, dirs[1], chat=False)
    assert [t for _, t in mixed] == [t for _, t in one_by_one]
    assert all(abs(a - b) < 1e-4 for (a, _), (b, _) in zip(mixed, one_by_one))
    assert abs(mixed[0][0] - mixed[2][0]) > 1e-3  # the two candidates really differ
