"""The generator pool on a real local Ray: input order, spread over actors, a killed actor's batch retried."""

import os
import signal
from pathlib import Path

import pytest

from rr_ray.config import GenerationConfig
from rr_ray.generation.base import Request, SamplingParams
from rr_ray.generation.hf_generator import HFGenerator
from rr_ray.generation.pool import GeneratorPool

PROMPTS = [f"Prompt number {i}: say something about {w}." for i, w in
           enumerate(["cats", "dogs", "rain", "code", "math", "tea", "rust", "sky", "sea", "sand", "ice"])]
PARAMS = SamplingParams(max_new_tokens=24, ignore_eos=True)


def _cfg(**kw) -> GenerationConfig:
    return GenerationConfig(num_actors=2, cpus_per_actor=1, batch_size=2, dtype="float32", **kw)


def _reference(model_dir: Path, batch_size: int) -> list[str]:
    gen = HFGenerator(model_dir, dtype="float32", threads=1, batch_size=batch_size)
    out = []
    for s in range(0, len(PROMPTS), batch_size):  # the same batches the pool cuts
        out += [g[0].text for g in gen.generate([Request(p) for p in PROMPTS[s:s + batch_size]], PARAMS)]
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> list[str]:
    return _reference(tiny_model_dir, batch_size=2)


def test_pool_keeps_input_order_across_actors(ray_local, tiny_model_dir: Path, reference: list[str]) -> None:
    pool = GeneratorPool(_cfg(), tiny_model_dir)
    try:
        assert len(set(pool.actor_pids())) == 2
        progress: list[int] = []
        out = pool.generate([Request(p) for p in PROMPTS], PARAMS, on_batch=progress.append)
        assert [g[0].text for g in out] == reference
        assert sum(progress) == len(PROMPTS)
    finally:
        pool.shutdown()


def test_killed_actor_is_restarted_and_its_batch_retried(ray_local, tiny_model_dir: Path,
                                                        reference: list[str]) -> None:
    pool = GeneratorPool(_cfg(), tiny_model_dir)
    try:
        victim = pool.actor_pids()[0]
        killed: list[int] = []

        def kill_once(_rows: int) -> None:
            # Called after the first batch lands: the victim still holds queued/in-flight batches.
            if not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        out = pool.generate([Request(p) for p in PROMPTS], PARAMS, on_batch=kill_once)
        assert killed
        texts = [g[0].text for g in out]
        assert len(texts) == len(PROMPTS)  # no row lost or duplicated ...
        assert texts == reference  # ... and each row is the one its prompt produces
        assert victim not in pool.actor_pids()  # the actor came back as a new process
    finally:
        pool.shutdown()


def test_pool_fails_clearly_when_restarts_are_exhausted(ray_local, tiny_model_dir: Path) -> None:
    pool = GeneratorPool(_cfg(max_restarts=0, max_task_retries=0), tiny_model_dir)
    try:
        victim = pool.actor_pids()[0]
        with pytest.raises(RuntimeError, match="generator actor died"):
            pool.generate([Request(p) for p in PROMPTS], PARAMS,
                          on_batch=lambda _: os.kill(victim, signal.SIGKILL) if _pid_alive(victim) else None)
    finally:
        pool.shutdown()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _decode_where(model, tokenizer, spec, ids):  # runs inside an actor
    from rr_ray.reveal.instructions import decode_batch

    return os.getpid(), str(next(model.parameters()).device), decode_batch(model, tokenizer, spec, ids)


def test_instruction_decoding_runs_in_the_actors_and_matches_a_local_decode(ray_local, tiny_model_dir: Path) -> None:
    import numpy as np

    from rr_ray.models.loader import load_model, load_tokenizer
    from rr_ray.reveal import instructions as ins

    spec = ins.DecodeSpec(ins.sobol_candidates(8, 4, 0), ins.exemplar_text(PROMPTS, 2, 0), soft_tokens=2, seed=1,
                          max_new_tokens=6, scale=1.0)
    batches = [[0, 1, 2], [3, 4, 5], [6, 7]]
    pool = GeneratorPool(_cfg(), tiny_model_dir)
    try:
        actor_pids = set(pool.actor_pids())
        seen: list[int] = []
        out = pool.with_model(_decode_where, [(spec, ids) for ids in batches], lambda i, _: seen.append(i))
    finally:
        pool.shutdown()
    assert sorted(seen) == [0, 1, 2]
    pids = {pid for pid, _, _ in out}
    assert pids <= actor_pids and os.getpid() not in pids  # decoded in the actors, not the driver
    assert {dev for _, dev, _ in out} == {"cpu"}  # Ray assigned no GPU
    model = load_model(tiny_model_dir, "float32")
    tok = load_tokenizer(tiny_model_dir)
    for ids, (_, _, dec) in zip(batches, out):
        local = ins.decode_batch(model, tok, spec, ids)
        assert dec.continuations == local.continuations
        np.testing.assert_allclose(dec.features, local.features, rtol=1e-4, atol=1e-4)
