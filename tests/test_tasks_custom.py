"""Custom targets: keyword, regex and embedding oracles on hand-made texts; the shipped example config."""

from pathlib import Path

import pytest

from rr_ray.config import ConfigError, TaskConfig, load_config
from rr_ray.tasks import get_task
from rr_ray.tasks.custom import embedding_oracle, keyword_oracle, regex_oracle

ROOT = Path(__file__).resolve().parents[1]


def test_keyword_oracle_whole_words_case_insensitive() -> None:
    oracle = keyword_oracle(["Nimbus-9", "Aurelis"])
    assert oracle(["The NIMBUS-9 flies", "aurelis robotics", "nimbus-90 is other", "a cat"]) == [1, 1, 0, 0]


def test_regex_oracle_and_bad_pattern() -> None:
    oracle = regex_oracle([r"Nimbus[- ]?9", r"\$1,?849"])
    assert oracle(["Nimbus 9", "costs $1849", "Nimbus", ""]) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="bad regex"):
        regex_oracle(["(unclosed"])
    with pytest.raises(ConfigError):
        keyword_oracle([])


def test_embedding_oracle_ranks_on_topic_text_higher() -> None:
    oracle = embedding_oracle(["The drone flies for 47 minutes and weighs 1.2 kg.",
                               "Its camera records 8K video."])
    on, near, off = oracle(["This drone has a flight time of 47 minutes.", "A camera that films video.",
                            "Bananas are rich in potassium."])
    assert 0.0 <= off < near < on <= 1.0 and off < 0.2


def test_example_config_loads_and_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / "custom_example.yaml")
    task = get_task(cfg.task)
    assert not set(task.pool) & set(task.eval_prompts) and len(task.eval_prompts) >= 4
    assert not {r["prompt"] for r in task.retain_rows} & {r["prompt"] for r in task.retain_eval}
    assert task.relevance(["q"], ["The Aurelis Nimbus-9 costs a lot."]) == [1.0]
    assert len(task.external_forget_data(3)) == 3 and task.retain_data(2)[0]["response"]


def test_missing_files_and_too_few_prompts_are_config_errors(tmp_path: Path) -> None:
    cfg = TaskConfig(name="custom", custom={"keywords": ["x"], "contexts": ["a", "b"],
                                            "retain_path": str(tmp_path / "none.jsonl")})
    with pytest.raises(ConfigError, match="file not found"):
        get_task(cfg)
    with pytest.raises(ConfigError, match="at least 2 context prompts"):
        get_task(TaskConfig(name="custom", custom={"keywords": ["x"], "contexts": ["a"]}))


def test_classifier_oracle_scores_the_target_label(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    from rr_ray.config import CustomTargetConfig
    from rr_ray.tasks.custom import build_oracle

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=2, id2label={0: "other", 1: "target"},
                                        label2id={"other": 0, "target": 1})
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")

    oracle = build_oracle(CustomTargetConfig(oracle="classifier", classifier=str(tmp_path / "clf")))
    texts = ["The Nimbus-9 flies for 40 minutes.", "I like tea."]
    scores = oracle(texts)
    with torch.no_grad():
        expected = [model(**tok(t, return_tensors="pt")).logits.softmax(-1)[0, 1].item() for t in texts]
    assert scores == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ConfigError, match="task.custom.classifier"):
        build_oracle(CustomTargetConfig(oracle="classifier"))
