"""``rr-ray export``: every exported form loads with plain transformers / peft and computes the same model.

Three independent routes to eq. 1's model must give the same logits (float32, tiny model):
the merged checkpoint, the base + composed LoRA through peft, and the base + each exported PEM activated
together in peft with its coefficient from export/edit_log.json (peft's own multi-adapter path, no rr-ray code).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rr_ray.cli import main, run_config
from rr_ray.export import _vllm_hint, export_run
from rr_ray.storage import RunDir
from tests.conftest_s3 import s3_server, s3_uri  # noqa: F401
from tests.handmade_run import EDITS, make_release_run

TOL = 1e-4  # max |logit difference| between routes; the edits themselves move logits by far more (checked)


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, dict, Path]:
    root = tmp_path_factory.mktemp("export-run") / "run"
    run, cfg = make_release_run(tiny_model_dir, root)
    return run, export_run(run, cfg), root / "export"


def _ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return tok(["Write a function that adds two numbers.", "def fib(n):"], return_tensors="pt",
               padding=True)["input_ids"]


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits.float()


def _base(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def _stack_via_edit_log(model_dir: Path, export: Path) -> torch.nn.Module:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    log = json.loads((export / "edit_log.json").read_text())
    first, *rest = log["edits"]
    model = PeftModel.from_pretrained(_base(model_dir), str(export / first["adapter"]), adapter_name=first["step"])
    for e in rest:
        model.load_adapter(str(export / e["adapter"]), adapter_name=e["step"])
    model.base_model.set_adapter([e["step"] for e in log["edits"]], inference_mode=True)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for e in log["edits"]:
                module.set_scale(e["step"], e["coef"])  # scaling = c_i * alpha / r
    return model


def test_export_writes_every_form(exported: tuple[RunDir, dict, Path], tiny_model_dir: Path) -> None:
    run, info, export = exported
    for rel in ("merged/config.json", "merged/model.safetensors", "merged/tokenizer.json",
                "composed_lora/adapter_config.json", "composed_lora/adapter_model.safetensors",
                "edit_log.json", "README.md"):
        assert (export / rel).is_file(), rel
        assert run.exists(f"export/{rel}")  # recorded in the manifest through upload_dir
    log = json.loads((export / "edit_log.json").read_text())
    assert log["base"] == str(tiny_model_dir)
    assert [(e["adapter"], e["coef"], e["kind"]) for e in log["edits"]] == [
        (f"adapters/{step}", coef, kind) for step, kind, coef, _, _ in EDITS]
    for step, *_ in EDITS:
        assert (export / f"adapters/{step}/adapter_model.safetensors").is_file()
    assert info["composed_rank"] == sum(r for *_, r, _ in EDITS)
    readme = (export / "README.md").read_text()
    assert "from_pretrained" in readme and "PeftModel" in readme
    assert "--max-lora-rank 8 " in readme  # rank 6 -> the smallest rank vLLM accepts above it
    assert run.is_done("export")


def test_exported_forms_agree(exported: tuple[RunDir, dict, Path], tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, export = exported
    ids = _ids(export / "merged")
    assert AutoTokenizer.from_pretrained(str(export / "merged")).chat_template  # the chat template ships too
    base = _logits(_base(tiny_model_dir), ids)
    merged = _logits(AutoModelForCausalLM.from_pretrained(str(export / "merged")), ids)
    composed = _logits(PeftModel.from_pretrained(_base(tiny_model_dir), str(export / "composed_lora")), ids)
    stack = _logits(_stack_via_edit_log(tiny_model_dir, export), ids)
    assert (merged - base).abs().max() > 100 * TOL  # the edits are really in there
    assert (merged - composed).abs().max() < TOL
    assert (merged - stack).abs().max() < TOL
    assert (composed - stack).abs().max() < TOL


def test_export_is_idempotent(exported: tuple[RunDir, dict, Path]) -> None:
    run, info, export = exported
    weights = export / "merged/model.safetensors"
    before = weights.stat().st_mtime_ns
    assert export_run(run, run_config(run.uri, None, [])) == info
    assert weights.stat().st_mtime_ns == before


def test_a_clone_without_export_files_exports_again(exported: tuple[RunDir, dict, Path], tmp_path: Path) -> None:
    """export/ stays out of git: a cloned run has the done marker but not the files, and must not skip."""
    import shutil

    run, info, export = exported
    clone = tmp_path / "clone"
    shutil.copytree(Path(run.uri), clone, ignore=lambda d, names: ["export"] if Path(d) == Path(run.uri) else [])
    again = RunDir.open(str(clone))
    assert again.is_done("export") and not (clone / "export").exists()
    redone = export_run(again, run_config(again.uri, None, []))
    assert (clone / "export/merged/model.safetensors").is_file()
    assert redone["merged"] == f"{clone}/export/merged" and redone["composed_rank"] == info["composed_rank"]


def test_cli_export_of_an_s3_run(tiny_model_dir: Path, tmp_path: Path, s3_server: str, s3_uri: str,  # noqa: F811
                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("RR_RAY_CACHE", str(tmp_path / "cache"))  # where localize() puts the S3 adapters
    local_run, _ = make_release_run(tiny_model_dir, tmp_path / "run")
    remote = RunDir.open(s3_uri, endpoint_url=s3_server)
    remote.upload_dir(tmp_path / "run" / "release", "release")
    for rel in ("run.yaml", "edit_log.json"):
        remote.write_bytes(rel, local_run.read_bytes(rel))
    remote.mark_done("release", local_run.done_info("release") or {})
    assert main(["export", s3_uri, "--s3-endpoint-url", s3_server]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["merged"] == f"{s3_uri}/export/merged" and remote.is_done("export")
    assert remote.exists("export/adapters/lambda_1/adapter_model.safetensors")
    remote.download_dir("export/merged", tmp_path / "merged")
    ids = _ids(tmp_path / "merged")
    merged = _logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")), ids)
    composed = _logits(PeftModel.from_pretrained(_base(tiny_model_dir), str(tmp_path / "run/release/composed")), ids)
    assert (merged - composed).abs().max() < TOL


def test_export_without_release_is_one_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = RunDir.open(str(tmp_path / "empty"))
    run.write_text("run.yaml", "{}\n")
    assert main(["export", str(tmp_path / "empty")]) == 2


def test_vllm_hint_falls_back_to_the_merged_model() -> None:
    assert "--max-lora-rank 64 " in _vllm_hint(48)
    assert "above vLLM's largest LoRA rank" in _vllm_hint(600) and "merged/" in _vllm_hint(600)
