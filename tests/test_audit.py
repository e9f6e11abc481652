"""rr-ray audit: quantization round trips, edit location, prompt probes, recovery math, and the command itself on
a hand-made release run of the tiny model (every attack a real Ray task)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rr_ray.audit.locate import edit_norms, forget_similarity, per_layer
from rr_ray.audit.quantize import gguf_roundtrip, quantize_linear_weights, rtn
from rr_ray.audit.run import OUT, attacks, recovery, summarise, verdict_lines
from rr_ray.config import load_config
from rr_ray.release.loop import EDIT_LOG, FINAL_ADAPTER
from rr_ray.release.pem import EditLog, delta_weights
from tests.handmade_run import EDITS, make_release_run


def _weight(rows: int = 8, cols: int = 256, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.linspace(0.1, 3.0, cols)  # columns of unequal range


@pytest.mark.parametrize("bits", [8, 4])
def test_rtn_has_at_most_2_pow_bits_levels_per_group_and_half_a_step_of_error(bits: int) -> None:
    w, group = _weight(), 64
    q = rtn(w, bits, group)
    assert q.shape == w.shape and q.dtype == w.dtype
    for g in range(w.shape[1] // group):
        wg, qg = w[:, g * group:(g + 1) * group], q[:, g * group:(g + 1) * group]
        for row in range(w.shape[0]):
            assert len(set(qg[row].tolist())) <= 2 ** bits
            step = float(wg[row].max() - wg[row].min()) / (2 ** bits - 1)
            assert float((qg[row] - wg[row]).abs().max()) <= step / 2 + 1e-5
    assert float((rtn(w, 8, group) - w).abs().mean()) < float((rtn(w, 4, group) - w).abs().mean())


def test_rtn_falls_back_to_one_group_per_row_when_the_width_does_not_divide() -> None:
    w = _weight(cols=100)
    q = rtn(w, 4, 64)
    assert all(len(set(q[r].tolist())) <= 16 for r in range(w.shape[0]))


@pytest.mark.parametrize(("qtype", "levels"), [("Q8_0", 256), ("Q4_0", 16)])
def test_gguf_blocks_are_idempotent_and_have_few_levels(qtype: str, levels: int) -> None:
    w = _weight()
    back = gguf_roundtrip(w, qtype)
    assert back.shape == w.shape and not bool((back == w).all())
    again = gguf_roundtrip(back, qtype)
    assert float((again - back).abs().max()) <= 1e-3 * float(back.abs().max())  # a fixed point of the format
    blocks = back.reshape(-1, 32)
    assert max(len(set(b.tolist())) for b in blocks) <= levels
    assert float((gguf_roundtrip(w, "Q8_0") - w).abs().mean()) < float((gguf_roundtrip(w, "Q4_0") - w).abs().mean())


def test_quantizing_a_model_keeps_its_output_head(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    head = model.lm_head.weight.detach().clone()
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    info = quantize_linear_weights(model, "rtn4", 16)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1
    assert info["layers"] == linears and 0 < info["mean_abs_change"] < 0.5
    assert torch.equal(model.lm_head.weight, head)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_proj)
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize_linear_weights(model, "int3")


@pytest.fixture(scope="module")
def handmade(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("audit-run")
    run, cfg = make_release_run(tiny_model_dir, root)
    return run, cfg, root


def test_edit_norms_match_the_dense_update(handmade, tiny_model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    run, _, root = handmade
    rows = edit_norms(root / FINAL_ADAPTER, tiny_model_dir)
    dense = delta_weights(EditLog.from_json(run.read_json(EDIT_LOG)), root=root)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert {r["module"] for r in rows} == set(dense)
    for r in rows:
        expect = float(dense[r["module"]].double().norm())
        assert r["norm"] == pytest.approx(expect, rel=1e-6)
        assert r["relative"] == pytest.approx(expect / float(base[f"{r['module']}.weight"].norm()), rel=1e-5)
    kinds = per_layer(rows)
    assert set(kinds) == {k for *_, targets in EDITS for k in targets}
    assert all(layer in (0, 1) for pts in kinds.values() for layer, _ in pts)


def test_similarity_of_the_final_edit_to_itself_is_one_and_to_the_forget_pem_in_range(handmade) -> None:
    _, _, root = handmade
    step, *_ = EDITS[0]
    sim = forget_similarity(root / FINAL_ADAPTER, {step: root / f"release/{step}/adapter",
                                                   "itself": root / FINAL_ADAPTER}, k=2)
    assert sim["itself"]["normalised_mean"] == pytest.approx(1.0, abs=1e-5)
    assert sim["itself"]["normalised_std"] == pytest.approx(0.0, abs=1e-5)
    assert 0 < sim[step]["normalised_mean"] <= 1 + 1e-6 and sim[step]["modules"] == 2 * 2  # q, v x 2 layers


@pytest.fixture(scope="module")
def scorer(tiny_model_dir: Path):
    from rr_ray.evaluation.scoring import Scorer

    return Scorer.from_model_dir(tiny_model_dir, batch_size=4, threads=1)


def test_framed_scorer_asks_the_framed_prompt(scorer) -> None:
    from rr_ray.audit.probes import PROBES, FramedScorer, framing
    from rr_ray.generation.base import SamplingParams

    prompts, answers = ["Write a function that adds two numbers.", "Reverse a list."], ["def f(a, b):", "x[::-1]"]
    frame = framing("prefix_injection")
    framed = FramedScorer(scorer, frame)
    assert framed.loglik(prompts, answers) == scorer.loglik([frame(p) for p in prompts], answers)
    params = SamplingParams(max_new_tokens=8)
    assert framed.generate(prompts, params) == scorer.generate([frame(p) for p in prompts], params)
    shown = framing("in_context", [{"prompt": "Add 1 and 2.", "response": "3"}])("Add 2 and 2.")
    assert "Add 1 and 2." in shown and shown.endswith("Add 2 and 2.")
    with pytest.raises(ValueError, match="no external forget rows"):
        framing("in_context", [])
    with pytest.raises(ValueError, match="unknown probe"):
        framing("jailbreak")
    assert "paraphrase" in PROBES


def test_paraphrases_come_from_the_base_once(scorer) -> None:
    from rr_ray.audit.probes import PARAPHRASE, PARAPHRASE_TOKENS, ParaphrasedScorer
    from rr_ray.generation.base import SamplingParams

    probe = ParaphrasedScorer(scorer)
    prompts = ["Write a function that adds two numbers.", "Reverse a list."]
    framed = probe.frame_all(prompts + prompts[:1])
    base = scorer.generate([PARAPHRASE.format(prompt=p) for p in prompts], SamplingParams(max_new_tokens=PARAPHRASE_TOKENS))
    assert framed == [(o[0].strip() or p) for p, o in zip(prompts, base)] + framed[:1]
    assert probe.loglik(prompts, ["a", "b"]) == scorer.loglik(framed[:2], ["a", "b"])
    assert len(probe.paraphrases) == 2


def test_recovery_and_verdicts() -> None:
    assert recovery(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert recovery(0.1, 0.2, 0.8) == pytest.approx(-1 / 6)
    assert recovery(0.9, 0.8, 0.8) is None  # nothing was removed
    cfg = load_config(None, ["audit.relearn_examples=[3]", "audit.quant_schemes=[rtn4]", "audit.probes=[roleplay]",
                             "audit.max_recovery=0.4"])
    ids = [a["id"] for a in attacks(cfg)]
    assert ids == ["plain", "relearn-n3", "rtn4", "roleplay"]

    def res(s: float) -> dict:
        return {"forget": {"s": s, "s_metric": "exact"}, "utility": {"u": 0.5}}

    results = {"plain": {"base": res(0.8), "unlearned": res(0.2)}, "relearn-n3": {"base": res(0.9), "unlearned": res(0.6)},
               "rtn4": {"base": res(0.8), "unlearned": res(0.3)}, "roleplay": {"base": res(0.7), "unlearned": res(0.1)}}
    summary = summarise(cfg, results, ["base", "unlearned"])
    by = {v["attack"]: v for v in summary["verdicts"]}
    assert by["relearn (relearn-n3)"]["verdict"] == "FAIL" and by["relearn (relearn-n3)"]["worst_recovery"] == pytest.approx(2 / 3)
    assert by["quantize"]["verdict"] == "PASS" and by["probe"]["worst_recovery"] == pytest.approx(-1 / 6)
    assert any(line.startswith("FAIL: relearn (relearn-n3) on unlearned") for line in verdict_lines(summary))


def test_scoring_leaves_room_for_one_relearning_trainer() -> None:
    from rr_ray.audit.run import score_slots

    default = load_config(None)  # 2 trainer workers x 1 CPU, 2 CPUs per scoring task
    assert score_slots(default, {"CPU": 2.0}) == 0  # on 2 CPUs the trainer goes first, alone
    assert score_slots(default, {"CPU": 16.0}) == 7
    small = load_config(None, ["release.train.num_workers=1", "generation.cpus_per_actor=1"])
    assert score_slots(small, {"CPU": 2.0}) == 1
    gpu = load_config(None, ["release.train.use_gpu=true", "generation.gpus_per_actor=1"])
    assert score_slots(gpu, {"CPU": 64.0, "GPU": 3.0}) == 1  # the GPUs, not the CPUs, bind


def test_audit_command_on_a_release_run(handmade, ray_local, capsys: pytest.CaptureFixture[str]) -> None:
    from rr_ray.cli import main

    run, _, root = handmade
    overrides = ["audit.limit=2", "audit.relearn_examples=[2]", "audit.relearn_steps=4", "audit.relearn_lr=0.05",
            "audit.quant_schemes=[rtn4,gguf-q4_0]", "audit.probes=[prefix_injection,paraphrase,in_context]",
            "release.train.num_workers=1", "release.train.batch_size=2", "release.train.max_length=512",
            "task.forget_metric=proxy", "task.utility_metric=proxy", "task.scoring_batch_size=4",
            "generation.cpus_per_actor=1"]
    sets = [arg for kv in overrides for arg in ("--set", kv)]
    assert main(["audit", str(root), *sets]) == 0
    err = capsys.readouterr().err
    saved = run.read_json(f"{OUT}/audit.json")
    rows = saved["summary"]["rows"]
    assert {r["attack"] for r in rows} == {"plain", "relearn-n2", "rtn4", "gguf-q4_0", "prefix_injection",
                                           "paraphrase", "in_context"}
    assert {r["model"] for r in rows} == {"base", "unlearned"}
    plain = {r["model"]: r["s"] for r in rows if r["attack"] == "plain"}
    assert plain["base"] != plain["unlearned"]  # the hand-made edit really changes the model
    relearned = {r["model"]: r["s"] for r in rows if r["attack"] == "relearn-n2"}
    assert all(relearned[m] != plain[m] for m in plain)  # the relearning LoRA is really applied
    for v in saved["summary"]["verdicts"]:
        assert v["verdict"] in {"PASS", "FAIL", "n/a"} and f"{v['verdict']}: {v['attack']} on unlearned" in err
    assert run.exists(f"{OUT}/relearn-n2/unlearned/train.json") and run.exists(f"{OUT}/relearn-n2/base/composed/adapter_config.json")
    md = run.read_text("report/audit.md")
    assert "| gguf-q4_0 |" in md and "Where the edit lives" in md and "vs forget PEM mu_0" in md
    assert run.read_bytes("report/audit.png")[:8] == b"\x89PNG\r\n\x1a\n"
    first = {p.name: p.stat().st_mtime_ns for p in (root / OUT / "rtn4").iterdir()}
    assert main(["audit", str(root), *sets]) == 0  # resumes: every result is read back, nothing rescored
    assert {p.name: p.stat().st_mtime_ns for p in (root / OUT / "rtn4").iterdir()} == first
    assert json.loads(json.dumps(run.read_json(f"{OUT}/audit.json")))["summary"]["rows"] == rows


def test_audit_of_a_run_without_a_release_is_one_clear_error(tmp_path: Path) -> None:
    from rr_ray.cli import main

    (tmp_path / "run.yaml").write_text("{}\n")
    assert main(["audit", str(tmp_path)]) == 2


def test_a_compared_method_reused_from_the_run_is_audited_once(tmp_path: Path) -> None:
    from rr_ray.audit.run import audit_models
    from rr_ray.storage import RunDir

    run = RunDir.open(str(tmp_path / "run"))
    ours = f"{run.uri}/release/composed"
    run.mark_done("release", {"composed_adapter": ours})
    run.write_json("compare/table.json", {"methods": {"reveal_release": {"adapter": ours},
                                                      "pem_external": {"adapter": f"{run.uri}/methods/p"},
                                                      "leave_as_is": {"adapter": None}}})
    assert audit_models(run) == {"base": None, "unlearned": ours, "pem_external": f"{run.uri}/methods/p"}
