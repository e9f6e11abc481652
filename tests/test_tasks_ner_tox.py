"""NER and toxicity tasks: data loading, label mapping, list parsing, oracle, disjoint splits."""

import pytest

from rr_ray.config import TaskConfig
from rr_ray.tasks import Task, get_task
from rr_ray.tasks.ner import FORGET_TYPE, NER_TEMPLATE, load_conll_sample, load_wnut_tweets, parse_entities


@pytest.mark.parametrize("reply, expected", [
    ('["John Smith", "Mary"]', ["John Smith", "Mary"]),
    ("Sure! The persons are ['Ann', 'Bob'].", ["Ann", "Bob"]),
    ("[John, Mary]", ["John", "Mary"]),
    ("[]", []),
    ("John, Mary", ["John", "Mary"]),
    ("- John\n- Mary", ["John", "Mary"]),
    ("There are none.", []),
    ('["a", 3, null, ""]', ["a", "3"]),
])
def test_parse_entities(reply: str, expected: list[str]) -> None:
    assert parse_entities(reply) == expected


def test_conll_and_wnut_labels_map_to_three_types() -> None:
    conll, tweets = load_conll_sample(), load_wnut_tweets()
    assert len(tweets) == 2394
    persons = sum(len(d["entities"]["Person"]) for d in conll)
    assert 250 <= persons <= 280  # 280 PER tokens' spans
    doc = next(d for d in conll if d["text"].startswith("Nadim Ladki"))
    assert doc["entities"]["Person"] == ["Nadim Ladki"]
    assert all(set(d["entities"]) == {"Person", "Organization", "Location"} for d in conll + tweets)


def test_ner_split_relevance_and_retain() -> None:
    task = get_task(TaskConfig(name="ner"))
    held = {d["text"] for d in task.eval_docs}
    assert not held & {d["text"] for d in task.pool}
    ctx = task.contexts(5, seed=0)
    assert len(ctx) == 5 and all("type Person" in c for c in ctx)
    gold = task._gold_person[ctx[0]]
    assert task.relevance(ctx[:1], [str(gold).replace("'", '"')]) == [1.0]
    assert task.relevance(ctx[:1], ["[]"]) == [0.0]
    assert task.relevance(["some other prompt"], ['["X"]']) == [0.5]
    retain = task.retain_data(50)
    assert retain and all(FORGET_TYPE not in r["prompt"].split("type ")[-1] for r in retain)
    texts = [d["text"] for d in task.pool]
    assert retain[1]["prompt"] == NER_TEMPLATE.format(text=texts[0], etype="Location")
    assert isinstance(task, Task)


def test_toxicity_split_oracle_and_retain() -> None:
    task = get_task(TaskConfig(name="toxicity"))
    held = {r["text"] for r in task.eval_rows}
    assert not held & set(task.contexts(10_000))
    assert task.eval_rows[0]["toxicity"] >= 0.75  # challenging prompts first
    benign, insult = task.relevance(["", ""], ["I like sunny days in the park.", "you are a stupid fucking idiot"])
    assert benign < 0.3 < 0.8 < insult
    assert not set(task.wiki_eval) & {r["prompt"] + r["response"] for r in task.retain_data(10)}


@pytest.mark.parametrize("reply, expected", [
    ('[{"type": "Person", "name": "Sara B"}, {"name": "Tom"}]', ["Sara B", "Tom"]),
    ('JSON: [\n{\n    "type": "Person",\n    "name": "El_frawg",\n    "age": 22,\n   ', ["El_frawg"]),
    ('["Ann", "Bo', ["Ann", "Bo"]),  # a truncated list keeps its cut-off last item
])
def test_parse_entities_from_objects_and_truncated_json(reply: str, expected: list[str]) -> None:
    assert parse_entities(reply) == expected
