from pathlib import Path

import pytest
import yaml

from rr_ray.config import ConfigError, RRConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_need_no_file() -> None:
    cfg = load_config(None)
    assert cfg == RRConfig()
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.release.rules.forget_ratio == 0.1 and cfg.release.rules.retain_ratio == 0.95


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    # The saved resolved config loads back to the same object.
    assert RRConfig.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg


def test_dotted_overrides_parse_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(None, ["release.lora.r=16", "generation.stop=['```', END]", "run.dir=s3://b/p"])
    assert cfg.release.lora.r == 16
    assert cfg.generation.stop == ["```", "END"]
    assert cfg.run.dir == "s3://b/p"


def test_override_wins_over_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("release:\n  lora:\n    r: 4\n")
    assert load_config(f, ["release.lora.r=32"]).release.lora.r == 32
    assert load_config(f).release.lora.r == 4


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("run:\n  dri: x\n", [], "run.dri: unknown key"),
        ("", ["foo=1"], "foo: unknown key"),
        ("generation:\n  batch_size: many\n", [], "generation.batch_size: Input should be a valid integer"),
        ("task:\n  name: poetry\n", [], "task.name: unknown task 'poetry'"),
        ("model:\n  name_or_path: no-such-model\n", [], "model.name_or_path: unknown model 'no-such-model'"),
        ("run: [1, 2\n", [], "malformed YAML at line 2"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        ("", ["release.lora.r"], "expected KEY=VALUE"),
        ("release:\n  lora:\n    r: 4\n", ["release.lora.r.x=1"], "'r' is not a section"),
        ("", ["release.lora.r.x=1"], "release.lora.r: Input should be a valid integer"),
    ],
)
def test_bad_input_is_one_line_naming_key_and_file(tmp_path: Path, text: str, overrides: list[str],
                                                   expected: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, overrides)
    msg = str(err.value)
    assert expected in msg
    assert "\n" not in msg
    if "KEY=VALUE" not in msg and "section" not in msg:
        assert str(f) in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_vllm_scoring_rank_above_vllms_limit_is_refused_at_load() -> None:
    assert load_config(None, ["task.scoring_backend=vllm"]).task.scoring_backend == "vllm"
    with pytest.raises(ConfigError, match="rank 768"):
        load_config(None, ["task.scoring_backend=vllm", "release.lora.r=256"])


def test_vllm_backend_without_vllm_is_refused_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match="needs vLLM"):
        load_config(None, ["generation.backend=vllm"])
    assert load_config(None, ["generation.backend=hf"]).generation.backend == "hf"


@pytest.mark.parametrize("data", [b"run:\n  dir: caf\xe9\n", b"\x00\x01\x02binary"])
def test_non_utf8_or_binary_config_is_one_line(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_resume_allows_resource_changes_and_names_a_result_field() -> None:
    from rr_ray.config import config_changes

    cfg = load_config(None, ["release.train.num_workers=4", "generation.num_actors=4"])
    stored = cfg.to_yaml()
    moved = load_config(None, ["release.train.num_workers=2", "generation.num_actors=1"])
    assert config_changes(stored, moved) == ([], ["generation.num_actors", "release.train.num_workers"])
    changed = load_config(None, ["release.train.num_workers=2", "release.lora.r=16"])
    refused, allowed = config_changes(stored, changed)
    assert refused == ["release.lora.r"] and allowed == ["generation.num_actors", "release.train.num_workers"]
    # a run recorded before a field existed resumes when the field holds its default, not otherwise
    old = yaml.safe_load(stored)
    del old["release"]["refine_rounds"]
    assert config_changes(yaml.safe_dump(old), cfg) == ([], [])
    assert config_changes(yaml.safe_dump(old), load_config(None, ["release.train.num_workers=4",
        "generation.num_actors=4", "release.refine_rounds=2"]))[0] == ["release.refine_rounds"]
    assert config_changes("[1, 2]", cfg)[0] == ["run.yaml (unreadable)"]
    # a moved run directory, or the compare that reuses it, changes no result
    reuser = load_config(None, ["release.train.num_workers=4", "generation.num_actors=4", "run.dir=elsewhere",
                                "compare.reuse={reveal_release: runs/default}"])
    assert config_changes(stored, reuser) == ([], ["compare.reuse", "run.dir"])


def test_compare_reuse_names_a_compared_entry() -> None:
    with pytest.raises(ConfigError, match="compare.reuse names 'dpo'"):
        load_config(None, ["compare.reuse={dpo: runs/x}"])
    cfg = load_config(None, ["compare.ablations=[forget_rule_60]", "compare.reuse={forget_rule_60: runs/x}"])
    assert cfg.compare.reuse == {"forget_rule_60": "runs/x"}


def test_task_options_are_checked_at_load() -> None:
    for override, needle in (("task.forget_metric=exact", "has no exact metric"),
                             ("task.utility_data=gsm8k", "code task only"),
                             ("release.retain_source=self", "answer oracle")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, ["task.name=toxicity", override])
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quality.yaml")
    assert (cfg.task.forget_metric, cfg.task.utility_metric, cfg.task.utility_data) == ("exact", "exact", "gsm8k")


def test_deepspeed_settings_are_checked_at_load() -> None:
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (the deepspeed extra)")
    assert load_config(None, ["release.train.strategy=deepspeed"]).release.train.zero_stage == 2
    with pytest.raises(ConfigError, match="zero_stage=3"):
        load_config(None, ["release.train.strategy=deepspeed", "release.train.zero_stage=3"])


def test_custom_task_without_its_section_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="keywords oracle needs it"):
        load_config(None, ["task.name=custom"])
    with pytest.raises(ConfigError, match="bad regex"):
        load_config(None, ["task.name=custom", "task.custom.oracle=regex", "task.custom.patterns=['(']"])
    with pytest.raises(ConfigError, match="at least 2 context prompts"):
        load_config(None, ["task.name=custom", "task.custom.keywords=[x]", "task.custom.contexts=[one]"])
    ok = load_config(None, ["task.name=custom", "task.custom.keywords=[x]", "task.custom.contexts=[a, b]"])
    assert ok.task.custom.keywords == ["x"]
