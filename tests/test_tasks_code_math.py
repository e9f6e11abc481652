"""Code and math tasks on hand-made cases: disjoint splits, code extraction, sandboxed relevance, answers."""

import pytest

from rr_ray.config import TaskConfig
from rr_ray.tasks import get_task, reveal_contexts
from rr_ray.tasks.code import IS_CODE, NOT_CODE, PASS, CodeTask, extract_code, parses
from rr_ray.tasks.math import MathUtility, answers_match, load_asdiv, parse_number


@pytest.fixture(scope="module")
def code() -> CodeTask:
    return get_task(TaskConfig(name="code"))


def test_code_contexts_disjoint_from_eval_and_deterministic(code: CodeTask) -> None:
    pool = {p["task_id"] for p in code.pool}
    held = {p["task_id"] for p in code.eval_problems}
    assert not pool & held and len(pool) + len(held) == 164
    ctx = code.contexts(100, seed=3)
    assert not any(p["prompt"] in c for c in ctx for p in code.eval_problems)
    assert reveal_contexts(TaskConfig(name="code", num_contexts=5), seed=1) == code.contexts(5, seed=1)
    assert get_task(TaskConfig(name="code")).eval_problems == code.eval_problems


def test_extract_code_from_fences_and_plain_text() -> None:
    reply = "Here you go:\n```python\ndef f(x):\n    return x + 1\n```\nDone."
    assert extract_code(reply) == "def f(x):\n    return x + 1"
    assert extract_code("```\nprint(1)\n```") == "print(1)"
    assert extract_code("x = 1") == "x = 1"
    two = "```python\nimport os\n```\n```python\ndef g():\n    pass\n```"
    assert extract_code(two) == "def g():\n    pass"
    assert parses("def f():\n    return 1") and not parses("def f(:")


def test_relevance_runs_tests_in_the_sandbox(code: CodeTask) -> None:
    probs = code.eval_problems[:2]
    prompts = [code.contexts(1)[0][:0] + "Solve this.\n" + p["prompt"] for p in probs]
    canonical = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in probs]
    body_only = [p["canonical_solution"] for p in probs]  # HumanEval completion format
    wrong = [f"```python\ndef {p['entry_point']}(*args):\n    return None\n```" for p in probs]
    assert code.relevance(prompts, canonical) == [PASS, PASS]
    assert code.relevance(prompts, body_only) == [PASS, PASS]
    assert code.relevance(prompts, wrong) == [IS_CODE, IS_CODE]
    assert code.relevance(prompts, ["I cannot help with that.", "def ("]) == [NOT_CODE, NOT_CODE]
    hostile = f"```python\ndef {probs[0]['entry_point']}(*a):\n    import os\n    os.system('true')\n```"
    assert code.relevance(prompts[:1], [hostile]) == [IS_CODE]  # contained, counted as a failure


def test_relevance_credits_the_share_of_assertions_passed(code: CodeTask) -> None:
    # A hand-made problem with four assertions: the reply below gets exactly the even inputs right.
    problem = {"task_id": "t/0", "entry_point": "double", "prompt": 'def double(x):\n    """2x"""\n',
               "canonical_solution": "    return 2 * x\n",
               "test": "def check(candidate):\n    assert True\n"
                       + "".join(f"    assert candidate({i}) == {2 * i}\n" for i in range(4))}
    task = CodeTask(TaskConfig(name="code"), problems=[problem, {**problem, "task_id": "t/1"}])
    prompt = ["Write it.\n" + problem["prompt"]]
    half = "```python\ndef double(x):\n    return 2 * x if x % 2 == 0 else 0\n```"
    assert task.relevance(prompt, [half]) == [IS_CODE + (PASS - IS_CODE) * 0.5]
    assert task.relevance(prompt, [f"```python\n{problem['prompt']}{problem['canonical_solution']}```"]) == [PASS]
    # The report line carries a per-call secret: printing lookalike lines from the reply earns nothing.
    forged = "```python\ndef double(x):\n    print('ok'); print('0 ok'); return None\n```"
    assert task.relevance(prompt, [forged]) == [IS_CODE]
    # A reply that hangs on the third input keeps the two it passed; the one in flight counts as failed.
    hangs = "```python\ndef double(x):\n    while x == 2:\n        pass\n    return 2 * x\n```"
    assert task.relevance(prompt, [hangs]) == [IS_CODE + (PASS - IS_CODE) * 2 / 3]


def test_every_canonical_solution_keeps_full_credit(code: CodeTask) -> None:
    # The assertion rewrite must not change what a test checks: every HumanEval reference solution still
    # passes all of its assertions.
    problems = code.pool + code.eval_problems
    replies = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in problems]
    scores = code.relevance(["Solve this.\n" + p["prompt"] for p in problems], replies)
    assert [p["task_id"] for p, s in zip(problems, scores) if s != PASS] == []


def test_code_external_forget_data_comes_from_the_pool(code: CodeTask) -> None:
    rows = code.external_forget_data(5)
    held = [p["prompt"] for p in code.eval_problems]
    assert len(rows) == 5 and not any(h in r["prompt"] for r in rows for h in held)


def test_parse_number_and_match() -> None:
    assert parse_number("So 3 + 4 = 7. The answer is 1,234 apples.") == 1234.0
    assert parse_number("It costs -2.5 dollars") == -2.5
    assert parse_number("no numbers here") is None
    assert parse_number("9 apples", last=False) == 9.0
    assert answers_match(7.0, 7) and not answers_match(None, 7) and not answers_match(7.1, 7)


def test_asdiv_numeric_rows_and_disjoint_math_split() -> None:
    rows = load_asdiv()
    assert 1500 < len(rows) < 2305 and all(isinstance(r["target"], float) for r in rows)
    first = next(r for r in rows if r["answer"] == "9 apples")
    assert first["target"] == 9.0
    util = MathUtility(rows)
    held = {r["question"] for r in util.eval_rows}
    retain = util.retain_data(10_000)
    assert len(held) >= 400 and not any(r["prompt"].split("\n")[0] in held for r in retain)


def test_validation_and_test_parts_are_disjoint_halves() -> None:
    from rr_ray.tasks.base import limited

    items = list(range(10))
    assert limited(items, None) == [0, 2, 4, 6, 8]
    assert limited(items, 3, "validation") == [1, 3, 5]
    assert not set(limited(items, None)) & set(limited(items, None, "validation"))
    assert limited([7], 4, "validation") == [7]  # one item serves both halves
    code = get_task(TaskConfig(name="code"))
    assert not {p["task_id"] for p in limited(code.eval_problems, 8)} & \
        {p["task_id"] for p in limited(code.eval_problems, 8, "validation")}


def test_cut_off_code_counts_as_code_only_when_valid_so_far() -> None:
    from rr_ray.tasks.code import is_code

    assert is_code('```python\ndef f(n):\n    """Return the\n    sum of')  # budget ran out in the docstring
    assert is_code("```python\ndef f(n):\n    return (n +\n        1")  # inside an open bracket
    assert not is_code("```python\ndef f(n):\n    return n +\n    x = = 2\n    y")  # broken before the cut
    assert not is_code('```python\nprint("no function"')  # valid so far but defines nothing
    assert not is_code("```python\ndef f(n):\n    return n +\n```")  # closed fence: must parse whole
